"""Lazy package-level exports: ``from lit_videoalign import GRPO`` imports ``objectives/grpo.py`` only when asked.

Each package ``__init__`` lists ``{public name: module}`` and installs the module-level ``__getattr__``/``__dir__``
(PEP 562) made here, so ``import lit_videoalign`` stays cheap (no torch, Lightning or diffusers) while every public
name is one attribute away. The module paths configs name (``lit_videoalign.objectives.grpo.GRPO``) are unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``exports[name]`` on first access and cache the name in
    the package's ``namespace`` (its ``globals()``)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
