"""Calibrating a digital twin on the device: the model, the query design, the fit.

A *calibration model* (docs/calibration.md) is a ``torch.nn.Module`` ``model(theta (n_params,),
x (batch, in_dim)) -> (batch, out_dim)`` whose ``nn.Parameter`` s are the chip's unknown
errors at their datasheet values. The twin methods (``methods/twin.py``) take it from
``--set model=package.module:function`` (the function may take the device object), else from
the device's own ``calibration_model()``; a device with neither stops with an error saying
what to pass. The fit is :class:`surrogates.CalibratedSurrogate`.

Query design (rules, valid for any model; the measurements behind them are in
docs/calibration.md):

- **Settings uniform over the whole bounds** (periodic or not; an unbounded parameter over
  ``theta0 +- scale / 2``). Settings spread over the range identify the parameters and
  predict everywhere, near the working point included, as well as a local design does
  there; a local design fits locally but leaves the parameters 5-10 times less accurate.
- **128 training inputs per setting** (one minibatch), the last ``REPEATS`` of them repeats
  of the first ones in the same query, so the read noise is estimated from the data (the
  fit's robust scale and stall threshold). More inputs per setting gain little: settings
  are what count, since every setting sees every parameter.
- **How many settings**: enough measured values for ``VALUES_PER_UNKNOWN`` per unknown
  parameter, ``ceil(20 * n_unknowns / (inputs * out_dim))``, at least ``MIN_SETTINGS`` (so
  that the 20 % hold-out of whole settings has 2 and restarts are judged on unseen
  settings), at most ``MAX_FRACTION`` of the budget (the rest trains). When every restart
  of the fit stalls, the twin methods double the settings, up to ``MAX_FRACTION`` of the
  budget and while each doubling cuts the held-out error by a quarter (``methods/twin.py``
  ``calibrate``): a local minimum needs more settings, a model-form error does not.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from blackbox_sat.devices.contract import InvalidInput, MissingCapability
from blackbox_sat.devices.spec import resolve_factory
from surrogates import CalibratedSurrogate
from surrogates.calibration_model import check_model

from .context import MINIBATCH, TrainContext

#: Measured values per unknown parameter the calibration design aims at.
VALUES_PER_UNKNOWN = 20
#: Fewest calibration settings: a 20 % hold-out of whole settings then has 2.
MIN_SETTINGS = 10
#: Largest share of the budget the default design takes.
MAX_FRACTION = 0.2
#: Inputs of a calibration setting that repeat others in the same query (read-noise estimate).
REPEATS = 8
#: Device-step settings a refit in the loop uses, the most recent ones (plus the design):
#: the twin must be right near the working point, which recent settings cover, and a refit
#: on every row grows with the budget (1100 s at 2000 settings on a 992-phase mesh).
REFIT_WINDOW = 128


class CalibrationModelError(InvalidInput):
    """The calibration model cannot be used (no parameters, wrong shape, NaN, not a module)."""


def resolve_calibration_model(source, spec: str | None) -> nn.Module:
    """The calibration model: the device's ``calibration_model()`` (``spec`` None or
    ``"device"``) or ``package.module:function`` called with the device object when it takes
    an argument."""
    if spec in (None, "", "device"):
        getter = getattr(source, "calibration_model", None)
        if getter is None:
            raise MissingCapability(
                f"{type(source).__name__} has no calibration_model(): pass your own with "
                "--set model=package.module:function, a function (optionally taking the device) "
                "returning a torch.nn.Module model(theta, x) -> y whose nn.Parameters are the "
                "chip's unknown errors at their datasheet values (docs/calibration.md)"
            )
        return getter()
    fn = resolve_factory(spec)
    try:
        takes_device = bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: try with the device
        takes_device = True
    return fn(source) if takes_device else fn()


def check_calibration_model(model, info, x: np.ndarray, theta: np.ndarray) -> None:
    """Refuse, before any setting is spent, a model that is not a module, has no parameters,
    or gives a wrong shape or non-finite outputs at ``theta (n_params,)``, ``x (batch, in_dim)``."""
    what = type(model).__name__
    try:  # the surrogate's own check: a module with parameters to identify
        check_model(model)
    except (TypeError, ValueError) as exc:
        raise CalibrationModelError(str(exc)) from None
    with torch.no_grad():
        y = model(torch.as_tensor(theta, dtype=torch.float64), torch.as_tensor(x).double())
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), info.out_dim):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CalibrationModelError(
            f"the calibration model {what} returned {shape} for theta ({info.n_params},) and x "
            f"({len(x)}, {info.in_dim}); expected ({len(x)}, {info.out_dim}) = (batch, out_dim)"
        )
    if not torch.isfinite(y).all():
        raise CalibrationModelError(
            f"the calibration model {what} returned NaN/inf at its datasheet parameters "
            f"({int((~torch.isfinite(y)).sum())} of {y.numel()} outputs at theta0)"
        )


def calibration_settings(n_unknowns: int, out_dim: int, inputs: int, budget: int) -> int:
    """The design's number of settings (module docstring): ``VALUES_PER_UNKNOWN`` values per
    unknown, at least ``MIN_SETTINGS``, at most ``MAX_FRACTION`` of ``budget`` (never below 4)."""
    need = math.ceil(VALUES_PER_UNKNOWN * n_unknowns / max(inputs * out_dim, 1))
    return int(min(max(need, MIN_SETTINGS), max(4, int(MAX_FRACTION * budget))))


def design_settings(info, n: int, rng: np.random.Generator, theta0: np.ndarray) -> np.ndarray:
    """``(n, n_params)`` settings uniform over the bounds (``theta0 +- scale / 2`` where a
    bound is infinite), projected onto the device domain."""
    finite = np.isfinite(info.low) & np.isfinite(info.high)
    lo = np.where(finite, info.low, theta0 - info.scale / 2)
    hi = np.where(finite, info.high, theta0 + info.scale / 2)
    return np.stack([info.project(t) for t in rng.uniform(lo, hi, (n, info.n_params))])


class Rows:
    """Measured rows for the fit, one group per setting: ``theta``, ``x``, ``y``, ``groups``."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        self.parts.append((np.asarray(theta, float), np.asarray(x, float), np.asarray(y, float)))

    def __len__(self) -> int:
        return len(self.parts)

    def window(self, recent: int, keep_first: int = 0) -> Rows:
        """The first ``keep_first`` settings (a calibration design) and the ``recent`` last."""
        out = Rows()
        head = self.parts[:keep_first]
        out.parts = head + self.parts[max(len(head), len(self.parts) - recent) :]
        return out

    def arrays(self, start: int = 0) -> tuple[np.ndarray, ...]:
        """``theta (m, P)``, ``x (m, D)``, ``y (m, out)``, ``groups (m,)`` of settings ``start:``."""
        parts = self.parts[start:]
        theta = np.concatenate([np.repeat(t[None], len(x), 0) for t, x, _ in parts])
        groups = np.concatenate([np.full(len(x), i) for i, (_, x, _) in enumerate(parts)])
        return (
            theta,
            np.concatenate([x for _, x, _ in parts]),
            np.concatenate([y for _, _, y in parts]),
            groups,
        )


def measure_design(ctx: TrainContext, n: int, rows: Rows, inputs: int = MINIBATCH) -> None:
    """Measure ``n`` design settings, ``inputs`` training inputs each (``REPEATS`` of them
    repeated), into ``rows``; purpose ``probe`` (charged)."""
    rng = np.random.default_rng([ctx.seed, 77, len(rows)])  # new settings for a second call
    thetas = design_settings(ctx.info, n, rng, ctx.theta0)
    n_train = len(ctx.y_train)
    repeats = min(REPEATS, inputs // 2)
    for theta in thetas:
        idx = rng.choice(n_train, min(inputs - repeats, n_train), replace=False)
        idx = np.concatenate([idx, idx[:repeats]])
        x = ctx.device_inputs(ctx.f_train[idx])
        rows.add(theta, x, ctx.device.query(theta, x, purpose="probe"))


def fit_twin(model: nn.Module, rows: Rows, seed: int, **options) -> CalibratedSurrogate:
    """Fit ``model`` to ``rows`` (:class:`surrogates.CalibratedSurrogate` with ``options``);
    a model the fit cannot use raises :class:`CalibrationModelError`."""
    try:
        return CalibratedSurrogate(model, seed=seed, **options).fit(*rows.arrays())
    except (TypeError, ValueError) as exc:
        raise CalibrationModelError(f"calibration failed: {exc}") from exc


def load_twin(path, model: nn.Module) -> CalibratedSurrogate:
    """A saved calibration (``calibration.pt`` of a run) rebuilt into a fresh ``model``."""
    try:
        return CalibratedSurrogate.load(path, model=model)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CalibrationModelError(
            f"{path} does not fit this calibration model (another device or model?): {exc}"
        ) from exc


def twin_report(sur: Any, source) -> dict:
    """The fit's report for ``result.json``, and the parameters' rms error against the
    simulator's ``calibration_truth()`` where it has one."""
    rep = {
        k: sur.report.get(k)
        for k in (
            "settings",
            "datasheet_heldout_nrmse",
            "heldout_nrmse",
            "r2_vs_datasheet",
            "restarts",
            "noise_nrmse",
            "fit_seconds",
            "escalations",
            "init",
        )
    }
    rep["attempts"] = [
        {k: a[k] for k in ("start", "heldout_nrmse", "stalled")}
        for a in sur.report.get("attempts", [])
    ]
    if "residual" in sur.report:
        rep["residual_kept"] = sur.report["residual"]["kept"]
        rep["residual_heldout_nrmse"] = sur.report["residual"]["heldout_nrmse"]
    truth = getattr(source, "calibration_truth", None)
    if callable(truth):
        from blackbox_sat.sim.calibration import parameter_rms

        with contextlib.suppress(KeyError, RuntimeError):  # a user's model, other parameters
            rep["parameter_rms"] = parameter_rms(sur.model, truth())
    return rep
