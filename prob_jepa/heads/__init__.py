"""Predictor heads: ``build_head(name, dim=D, cond_dim=C, **cfg)``.

Every module in this package (but ``base`` and ``layers``) registers its head
with :func:`register_head` when imported; they are all imported here, so adding
a head is adding a file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable

from .base import Head, fp32

HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    def register(cls: type[Head]) -> type[Head]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is registered twice ({HEADS[name].__name__}, {cls.__name__})")
        HEADS[name] = cls
        return cls

    return register


def build_head(name: str, dim: int, cond_dim: int, **cfg) -> Head:
    """Build head ``name`` modelling ``D = dim`` dimensional targets given ``C = cond_dim`` conditions."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(sorted(HEADS))}")
    cls = HEADS[name]
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "dim", "cond_dim")]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise TypeError(f"head {name!r} got unknown options {unknown}; valid options: {', '.join(valid)}")
    return cls(dim=dim, cond_dim=cond_dim, **cfg)


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "layers"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HEADS", "Head", "build_head", "fp32", "register_head"]
