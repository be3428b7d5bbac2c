"""Surrogates chosen by name: ``make_surrogate(kind, **kw)``.

| kind | class | what it assumes |
|---|---|---|
| ``"hyper"`` (default) | :class:`~surrogates.neural.EnsembleSurrogate` | ``theta``, each control warped by its own learned curve, generates the weights acting on ``x`` |
| ``"hyper-additive"`` | :class:`~surrogates.neural.EnsembleSurrogate` | the same, plus each control's own 1-D response |
| ``"mlp"`` | :class:`~surrogates.neural.EnsembleSurrogate` | nothing (baseline; learned poor gradients in prototypes) |
| ``"interferometric"`` | :class:`~surrogates.interferometric.InterferometricSurrogate` | intensities of a linear optical circuit of phase shifters |
| ``"interferometric-layers"`` | :class:`~surrogates.phase_layers.PhaseLayerSurrogate` | the same, global in the phases: the shifters' updates composed in learned layers |
| ``"gp"`` | :class:`~surrogates.gp.GPSurrogate` | a smooth response over ``[theta, x]``; small problems |
| ``"calibrated"`` | :class:`~surrogates.calibrated.CalibratedSurrogate` | the user's physics model (``model=``), only its error parameters unknown |
| ``"calibrated+residual"`` | :class:`~surrogates.calibrated.CalibratedSurrogate` | the same plus a small learned output correction |

Further kinds can be added with :func:`register_surrogate`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from functools import partial
from typing import Any

from .calibrated import CalibratedSurrogate
from .gp import GPSurrogate
from .interferometric import InterferometricSurrogate
from .neural import EnsembleSurrogate
from .phase_layers import PhaseLayerSurrogate
from .protocol import Surrogate

DEFAULT_KIND = "hyper"

_FACTORIES: dict[str, Callable[..., Surrogate]] = {
    # 6000 steps: at 1000 settings the fit was still improving at 3000 (mrr, oracle midway:
    # theta-part R² / gradient cosine 0.974 / 0.890 -> 0.989 / 0.906; docs/experiments.md#the-warp).
    "hyper": partial(EnsembleSurrogate, "hyper", max_steps=6000),
    "hyper-additive": partial(EnsembleSurrogate, "hyper-additive"),
    "mlp": partial(EnsembleSurrogate, "mlp"),
    "interferometric": InterferometricSurrogate,
    "interferometric-layers": PhaseLayerSurrogate,
    "gp": GPSurrogate,
    "calibrated": CalibratedSurrogate,
    "calibrated+residual": partial(CalibratedSurrogate, residual=True),
}


def register_surrogate(kind: str, factory: Callable[..., Surrogate]) -> None:
    """Make ``factory(**kw)`` available as ``make_surrogate(kind, **kw)``."""
    if kind in _FACTORIES:
        raise ValueError(f"surrogate kind {kind!r} is already registered")
    _FACTORIES[kind] = factory


def surrogate_kinds() -> list[str]:
    """Registered kind names."""
    return sorted(_FACTORIES)


def make_surrogate(kind: str = DEFAULT_KIND, **kw) -> Surrogate:
    """A new, unfitted surrogate of ``kind`` with constructor keywords ``kw`` (e.g.
    ``theta_low``, ``theta_high``, ``periodic``, ``seed``, ``n_members``)."""
    if kind not in _FACTORIES:
        raise ValueError(f"unknown surrogate kind {kind!r}; known: {surrogate_kinds()}")
    return _FACTORIES[kind](**kw)


def load_surrogate(path) -> Surrogate:
    """Any saved surrogate of this package, whatever its kind."""
    from .base import SurrogateBase

    return SurrogateBase.load(path)


#: Constructor keywords that the caller fills from the device, not options of a family.
_CONTEXT_KEYWORDS = ("theta_low", "theta_high", "periodic", "seed", "structure", "self")


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """Base of each family's generated options class."""


@functools.cache
def family_options(kind: str) -> type:
    """A frozen dataclass of ``kind``'s constructor options with their defaults.

    Generated from the constructor signatures along the class's bases (keywords passed on
    with ``**kw`` included), so the options a user can set never drift from what the family
    accepts. Pass ``make_surrogate`` only the options that differ from these defaults (a
    family may fill some of its base's keywords itself)."""
    if kind not in _FACTORIES:
        raise ValueError(f"unknown surrogate kind {kind!r}; known: {surrogate_kinds()}")
    factory = _FACTORIES[kind]
    fixed = dict(factory.keywords) if isinstance(factory, partial) else {}
    cls = factory.func if isinstance(factory, partial) else factory
    fields: dict[str, tuple[Any, Any]] = {}
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__") if isinstance(klass, type) else klass
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if (
                name in _CONTEXT_KEYWORDS
                or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                or name in fields
            ):
                continue
            if p.default is p.empty and name not in fixed:
                continue
            fields[name] = (hints.get(name, Any), fixed.get(name, p.default))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    spec = [
        (n, t, dataclasses.field(default_factory=partial(dict, d)) if isinstance(d, dict) else d)
        for n, (t, d) in fields.items()
    ]
    return dataclasses.make_dataclass(
        f"{kind.title().replace('-', '')}Options", spec, bases=(FamilyOptions,), frozen=True
    )
