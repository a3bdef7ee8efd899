"""A name -> object registry: methods, datasets, protocols and config sections each keep one.

A registry fills at its first read by importing the module that registers the built-in entries (and the
third-party plug-ins' entry points), so listing them, `--help` and plug-ins can rely on it, while a command
that reads none (`promptlearn --help`) imports none of them, nor torch.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from promptlearn.errors import ConfigError, unknown_name_message

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = ConfigError, filled_by: str | None = None):
        self.kind, self.error, self._added = kind, error, {}
        self._filled_by = filled_by  # the module whose import registers the entries, imported at the first read
        self._filling = False

    @property
    def _items(self) -> dict[str, T]:
        if self._filled_by is not None and not self._filling:
            self._filling = True  # reads while it imports see what it has added so far
            try:
                importlib.import_module(self._filled_by)
                self._filled_by = None  # only once the import worked: a failed one fails again, by its own error
            finally:
                self._filling = False
        return self._added

    def add(self, name: str, item: T) -> T:
        if name in self._added:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._added[name] = item
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


# every method by name (promptlearn.methods fills it on first read): here, below config and the methods, so that
# the config can ask what a method reads without importing the methods
METHODS: Registry = Registry("method", filled_by="promptlearn.methods")
