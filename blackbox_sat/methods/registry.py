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
    requires: tuple[str, ...] = ()  # device members beyond the contract's four (see missing())

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


def register(
    name: str,
    config: type,
    needs: str = "device",
    summary: str = "",
    requires: tuple[str, ...] = (),
):
    """Decorator: ``@register("spsa", SpsaConfig, needs="device", summary="...")``.

    ``requires``: optional device members the method cannot run without (``"bounds"``,
    ``"periodic"``, or a method name such as ``"sibling"``), checked before a run starts."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}")

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(
            name,
            fn,
            config,
            needs,
            summary or (fn.__doc__ or "").strip().split("\n")[0],
            tuple(requires),
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


def missing(spec: MethodSpec, device: Any, info: Any, config: Any) -> list[str]:
    """What ``device`` (its :class:`DeviceInfo` ``info``) lacks for ``spec`` with ``config``:
    one readable phrase per missing member; empty when the method can run."""
    out = []
    if spec.needs in ("nominal", "true") and getattr(device, f"{spec.needs}_model", None) is None:
        out.append(f"a {spec.needs}_model() (simulators offer one; a black-box device does not)")
    if (
        spec.needs == "approximate"
        and getattr(config, "model", None) in (None, "nominal")
        and getattr(device, "nominal_model", None) is None
    ):
        out.append("an approximate model: --set model=package.module:function")
    for member in spec.requires:
        if member == "bounds" and not info.has_bounds:
            out.append("`bounds` (low, high) for every parameter")
        elif member == "periodic" and not info.periodic.any():
            out.append("periodic parameters (`periodic`, with finite bounds)")
        elif member not in ("bounds", "periodic") and getattr(device, member, None) is None:
            out.append(f"`{member}`")
    return out
