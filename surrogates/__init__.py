"""Surrogates of devices nobody can differentiate, and the design of the queries they learn from.

This package sees arrays only (``theta``, ``x``, ``y``); it knows nothing of devices, ledgers
or training, and imports nothing from ``blackbox_sat``.

Every surrogate follows :class:`Surrogate`: ``fit(theta, x, y, groups=None)``,
``update(theta, x, y, groups=None, *, steps=None, append=False, centre=None)``,
``predict(theta, x) -> torch.Tensor`` (differentiable in ``theta`` and ``x``),
``predict_with_uncertainty(theta, x) -> (mean, std)``, ``save(path)`` and ``load(path)``.

Public API:

- :func:`make_surrogate` ``(kind="hyper", **kw)``, :func:`surrogate_kinds`,
  :func:`register_surrogate`, :func:`load_surrogate`;
- :class:`EnsembleSurrogate` (``"hyper"``, ``"mlp"``): deep ensembles with stacked weights;
  ``recentre(centre)`` moves the ``theta`` origin exactly (``update(..., centre=theta)``
  does it before refitting);
- :class:`InterferometricSurrogate` (``"interferometric"``): ``|U(theta) x|^2`` with one
  rank-1 update per phase shifter, re-centred (``recentre``) as ``theta`` moves;
- :class:`PhaseLayerSurrogate` (``"interferometric-layers"``): the same updates composed in
  learned layers, a model global in the phases;
- :class:`GPSurrogate` (``"gp"``): exact or variational gpytorch GP;
- :class:`CalibratedSurrogate` (``"calibrated"``, ``"calibrated+residual"``): grey-box
  calibration of a user's physics model (``model=``): its error parameters are fitted;
- query design: :func:`trust_region`, :func:`space_filling`, :func:`design_settings`
  (returning a :class:`SettingsDesign`), :func:`inputs_per_setting`, :func:`estimate_noise`.

Module map: ``protocol`` (the contract), ``base`` (shapes, persistence), ``normalize``,
``encoding`` (periodic inputs), ``dataset`` (rows, settings, hold-out splits), ``ensemble``
(stacked layers), ``training`` (the minibatch loop), ``structures`` (network families),
``neural``, ``interferometric``, ``phase_layers``, ``gp``, ``design``, ``registry``.
"""

from .base import SurrogateBase
from .calibrated import CalibratedSurrogate
from .design import (
    SettingsDesign,
    design_settings,
    estimate_noise,
    inputs_per_setting,
    space_filling,
    trust_region,
)
from .gp import GPSurrogate
from .interferometric import InterferometricSurrogate
from .neural import EnsembleSurrogate
from .phase_layers import PhaseLayerSurrogate
from .protocol import Surrogate
from .registry import load_surrogate, make_surrogate, register_surrogate, surrogate_kinds

__all__ = [
    "CalibratedSurrogate",
    "EnsembleSurrogate",
    "GPSurrogate",
    "InterferometricSurrogate",
    "PhaseLayerSurrogate",
    "SettingsDesign",
    "Surrogate",
    "SurrogateBase",
    "design_settings",
    "estimate_noise",
    "inputs_per_setting",
    "load_surrogate",
    "make_surrogate",
    "register_surrogate",
    "space_filling",
    "surrogate_kinds",
    "trust_region",
]
