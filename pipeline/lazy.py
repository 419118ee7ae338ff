"""Lazy package exports (PEP 562): a package names its public API without importing its submodules.

The CLI's ``--help`` and ``--version`` import option choices from pipeline.rerank, pipeline.index and
pipeline.model; their submodules import torch and faiss (seconds), which only the commands that run them need.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any


class _LazyPackage(types.ModuleType):
    _module_of: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        module_of = self.__dict__.get("_module_of", {})
        if name not in module_of:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module_of[name]), name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule sets it as an attribute of its package. Where an exported name has the same
        # spelling (pipeline.index.search, the function), the export wins, as it did with eager imports.
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_module_of", {}):
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]) -> None:
    """Make ``package`` export the names ``exports`` lists by submodule (``{"match": ("match", "pad")}``),
    each submodule imported when one of its names is first used; sets the package's ``__all__``."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._module_of = {name: f"{package}.{sub}" for sub, names in exports.items() for name in names}
    module.__all__ = sorted(module._module_of)
