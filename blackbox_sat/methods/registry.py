"""One registry of training methods, by name (DESIGN.md section 3, "Method names").

A method is a function ``fn(ctx: TrainContext) -> MethodResult`` registered with its
hyperparameter defaults (data, so ``--set`` can override and ``result.json`` records them)
and what it needs: ``device`` (queries only), ``nominal`` or ``true`` (a simulator view).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

NEEDS = ("device", "nominal", "true", "approximate")


@dataclass
class MethodResult:
    theta: np.ndarray
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    defaults: dict
    needs: str
    summary: str

    @property
    def model_based(self) -> bool:
        """Uses a simulator's model instead of device queries (reports 0 settings)."""
        return self.needs in ("nominal", "true")


METHODS: dict[str, MethodSpec] = {}


def register(name: str, defaults: dict | None = None, needs: str = "device", summary: str = ""):
    """Decorator: ``@register("spsa", {"a": 0.1}, needs="device", summary="...")``."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}")

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, fn, dict(defaults or {}), needs, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return list(METHODS)


def _load_builtin_methods() -> None:
    from . import model_based  # noqa: F401  (registers on import)
    for optional in ("gradient_free", "blackbox", "harmonic"):
        try:
            __import__(f"{__package__}.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{optional}":
                raise
