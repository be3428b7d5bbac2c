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

from collections.abc import Callable
from functools import partial

from .calibrated import CalibratedSurrogate
from .gp import GPSurrogate
from .interferometric import InterferometricSurrogate
from .neural import EnsembleSurrogate
from .phase_layers import PhaseLayerSurrogate
from .protocol import Surrogate

DEFAULT_KIND = "hyper"

_FACTORIES: dict[str, Callable[..., Surrogate]] = {
    # 6000 steps: at 1000 settings the fit was still improving at 3000 (mrr, oracle midway:
    # theta-part R² / gradient cosine 0.974 / 0.890 -> 0.989 / 0.906; README).
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
