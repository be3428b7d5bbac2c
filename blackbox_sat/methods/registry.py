"""One registry of training methods, by name.

A method is a function ``fn(ctx: TrainContext) -> MethodResult`` registered with its
configuration class (a frozen dataclass: its defaults are data, ``--set`` overrides them by
dotted keys and ``config.json`` records the resolved values) and what it needs: ``device``
(queries only), ``nominal`` or ``true`` (a simulator view), ``approximate`` (a model given by
the user or the device).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blackbox_sat.devices.contract import UserError


class UnknownMethod(UserError, KeyError):
    """No method is registered under that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


NEEDS = ("device", "nominal", "true", "approximate")


@dataclass
class MethodResult:
    theta: np.ndarray
    extra: dict = field(default_factory=dict)
    #: Files for the run directory: name -> writer(path), e.g. a twin's ``calibration.pt``.
    files: dict[str, Callable[[Any], None]] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., MethodResult]
    config: type  # frozen dataclass of the method's options
    needs: str
    summary: str

    @property
    def defaults(self) -> dict[str, Any]:
        """The default configuration as plain data."""
        from blackbox_sat.training.config import as_dict

        return as_dict(self.config())

    @property
    def model_based(self) -> bool:
        """Uses a simulator's model instead of device queries (reports 0 settings)."""
        return self.needs in ("nominal", "true")


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type, needs: str = "device", summary: str = ""):
    """Decorator: ``@register("spsa", SpsaConfig, needs="device", summary="...")``."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}")

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(
            name, fn, config, needs, summary or (fn.__doc__ or "").strip().split("\n")[0]
        )
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownMethod(
            f"unknown method {name!r}; {hint}registered: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def method_names() -> list[str]:
    return list(METHODS)
