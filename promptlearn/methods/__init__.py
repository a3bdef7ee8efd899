"""Methods, one module each, registered by name on import.

Every module of this package is imported here, so `METHODS` is complete once `promptlearn.methods`
is; third-party methods register through the `promptlearn.methods` entry-point group.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from promptlearn.methods.base import (
    METHODS,
    AfterTraining,
    Capabilities,
    Method,
    build_method,
    method_class,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
for _plugin in entry_points(group="promptlearn.methods"):
    _plugin.load()

__all__ = ["METHODS", "AfterTraining", "Capabilities", "Method", "build_method", "method_class",
           "register_method"]
