"""Methods, one module each, registered by name."""
from __future__ import annotations

from typing import Callable

from promptlearn.errors import ConfigError, unknown_name_message
from promptlearn.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def build_method(name: str, cfg, backbone, classnames: list[str]) -> Method:
    _import_methods()
    if name not in METHODS:
        raise ConfigError(unknown_name_message("method", name, METHODS))
    return METHODS[name](cfg, backbone, classnames).to(backbone.device)


def _import_methods() -> None:
    from promptlearn.methods import clip_adapter, coop, linear_probe, tip_adapter, zeroshot  # noqa: F401


__all__ = ["METHODS", "Method", "build_method", "register_method"]
