"""A name -> object registry: methods, datasets, protocols and config sections each keep one.

Registries fill when their package is imported (eager registration), so listing them, `--help` and
third-party plug-ins (entry points) can rely on them.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from promptlearn.errors import ConfigError, unknown_name_message

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = ConfigError):
        self.kind, self.error, self._items = kind, error, {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(unknown_name_message(self.kind, name, self._items))
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def items(self):
        return self._items.items()

    def names(self) -> list[str]:
        return list(self._items)
