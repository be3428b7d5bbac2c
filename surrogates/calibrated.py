"""Grey-box calibration ("digital twin"): fit a physics model's unknown error parameters.

The user knows the circuit's structure and writes it as a *calibration model*; the fit
identifies the chip's errors from measured outputs. Families ``"calibrated"`` and
``"calibrated+residual"`` (:class:`CalibratedSurrogate`).

The calibration model's contract (the module the user writes) is in
:mod:`surrogates.calibration_model`; the fit (loss, prior, hold-out, restarts, residual) in
:mod:`surrogates.calibration_fit`.

``predict(theta, x)`` is differentiable in ``theta`` and ``x``; rows are grouped by distinct
``theta`` and predicted in one batched pass. ``predict_with_uncertainty`` returns a zero std
(a single identified model has no ensemble spread). ``update`` refits warm from the current
parameters (no restarts, no hold-out). ``save`` stores parameters and state, not the model's
code: reload with ``CalibratedSurrogate.load(path, model=sim.calibration_model())``.

Errors: a model that is not an ``nn.Module``, has no parameters, returns the wrong shape or
returns non-finite values at its datasheet parameters raises ``TypeError``/``ValueError``
naming the problem.
"""

from __future__ import annotations

import json
import time
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import _FORMAT_VERSION
from .calibration_fit import DEFAULT_NOISE, HUBER_K, CalibrationFit
from .calibration_model import (
    ModelCall,
    MonotoneMap,
    Packed,
    ResidualNet,
    check_model,
    position_in_group,
)
from .dataset import dense_groups, groups_from_theta
from .protocol import ArrayLike

_F64 = torch.float64


class CalibratedSurrogate(CalibrationFit):
    """Grey-box calibration of ``model`` (the contract: :mod:`surrogates.calibration_model`;
    the fit: :mod:`surrogates.calibration_fit`).

    Args:
        model: the calibration model (``nn.Module``), parameters at datasheet values.
        residual: add the learned output correction (``"calibrated+residual"``).
        residual_form: ``"monotone"`` (default): an increasing 1-D map per output of the
            model's output (:class:`~surrogates.calibration_model.MonotoneMap`), the shape
            of a detector's gain and compression; ``"mlp"``: a network on ``[y, x]``
            (:class:`~surrogates.calibration_model.ResidualNet`, DAT's form).
        optimizer: ``"lbfgs"`` (default) or ``"adam"``.
        max_iter: L-BFGS iterations (or Adam steps) per attempt.
        tol: stop an attempt when a chunk of 25 iterations improves the loss by less than
            this fraction (an L-BFGS run that stops early but made progress is resumed with
            fresh memory).
        loss: ``"huber"``, ``"soft_l1"`` or ``"mse"``.
        noise: read-noise std in output units (scalar or ``(out_dim,)``), if known.
        prior_weight: ``"auto"`` (MAP, see the fit), a float, or 0 for none.
        holdout: share of settings held out (0: none).
        max_restarts, restart_scale, stall_factor, stall_fraction: restarts (see the fit).
        refit_all: after choosing the best attempt, refit warm on all settings.
        residual_hidden, residual_steps, residual_lr, residual_l2, residual_gate,
            residual_joint: the ``"mlp"`` network's width; the residual's Adam steps and
            rate, output penalty, the rule that keeps it only if it lowers the held-out
            error, and a joint L-BFGS refinement of model and residual after its own fit.
        adam_lr: Adam's rate in whitened units (prior std).
        theta_low, theta_high, periodic, seed, dtype: as for every surrogate (bounds and
            periodicity are accepted for the common interface and not used: the model knows
            its own physics). ``dtype`` is that of predictions; the fit is in float64.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        residual: bool = False,
        residual_form: str = "monotone",
        optimizer: str = "lbfgs",
        max_iter: int = 400,
        tol: float = 1e-6,
        loss: str = "huber",
        noise: float | ArrayLike | None = None,
        prior_weight: float | str = "auto",
        holdout: float = 0.2,
        max_restarts: int = 3,
        restart_scale: float = 1.0,
        stall_factor: float = 2.0,
        stall_fraction: float = 0.1,
        refit_all: bool = True,
        residual_hidden: int = 64,
        residual_steps: int = 1500,
        residual_lr: float = 3e-3,
        residual_l2: float = 1e-3,
        residual_gate: bool = True,
        residual_joint: bool = True,
        adam_lr: float = 0.05,
        theta_low=None,
        theta_high=None,
        periodic=None,
        seed: int = 0,
        dtype: str = "float64",
    ):
        super().__init__(
            theta_low=theta_low, theta_high=theta_high, periodic=periodic, seed=seed, dtype=dtype
        )
        checked = check_model(model)
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if residual_form not in ("monotone", "mlp"):
            raise ValueError(f"residual_form must be 'monotone' or 'mlp', got {residual_form!r}")
        if loss not in ("huber", "soft_l1", "mse"):
            raise ValueError(f"loss must be 'huber', 'soft_l1' or 'mse', got {loss!r}")
        self.model = checked.to(_F64)
        self._call = ModelCall(self.model)
        self.residual, self.optimizer, self.max_iter, self.tol, self.loss = (
            bool(residual),
            optimizer,
            int(max_iter),
            float(tol),
            loss,
        )
        self.noise = None if noise is None else np.asarray(noise, np.float64).tolist()
        self.prior_weight = prior_weight
        self.holdout, self.max_restarts, self.restart_scale = (
            float(holdout),
            int(max_restarts),
            float(restart_scale),
        )
        self.stall_factor, self.stall_fraction, self.refit_all = (
            float(stall_factor),
            float(stall_fraction),
            bool(refit_all),
        )
        self.residual_hidden, self.residual_steps, self.residual_lr = (
            int(residual_hidden),
            int(residual_steps),
            float(residual_lr),
        )
        self.residual_l2, self.residual_gate, self.adam_lr = (
            float(residual_l2),
            bool(residual_gate),
            float(adam_lr),
        )
        self.residual_joint = bool(residual_joint)
        self.residual_form = residual_form
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # Datasheet values and scales: fixed at construction (the model's current values).
        self.p0 = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names
        }
        scales = getattr(self.model, "parameter_scale", None)
        scales = scales() if callable(scales) else {}
        self.scale = {
            n: torch.broadcast_to(
                torch.as_tensor(scales.get(n, 1.0), dtype=_F64), self.p0[n].shape
            ).clone()
            for n in self.names
        }
        self.net: ResidualNet | MonotoneMap | None = None
        self.residual_active = False
        self.report: dict[str, Any] = {}
        self._rows: tuple[np.ndarray, ...] | None = None
        self._delta = 1.0
        self._noise_norm: float | None = None

    def identified(self) -> dict[str, np.ndarray]:
        """The fitted parameters, ``{name: array}`` in the model's units."""
        return {
            n: p.detach().double().numpy().copy()
            for n, p in self.model.named_parameters()
            if n in self.names
        }

    def fit(self, theta, x, y, groups=None) -> CalibratedSurrogate:
        t_start = time.perf_counter()
        self.n_params = None
        theta, x, y, groups = self._check_rows(theta, x, y, groups)
        self._rows = (theta, x, y, groups)
        n_groups = int(groups.max()) + 1
        spread = y.std(axis=0)
        spread = np.where(spread > 1e-12 * max(float(np.abs(y).max()), 1e-300), spread, 1.0)
        self.y_spread = torch.as_tensor(spread, dtype=_F64)
        self.y_loc = torch.as_tensor(y.mean(axis=0), dtype=_F64)
        self.x_loc = torch.as_tensor(x.mean(axis=0), dtype=_F64)
        xs = x.std(axis=0)
        self.x_scale = torch.as_tensor(np.where(xs > 1e-12, xs, 1.0), dtype=_F64)
        held = self._split(n_groups)
        is_held = np.isin(groups, held)
        all_data = Packed(theta, x, y, groups)
        self._check_outputs(all_data, y.shape[1])
        if held.size:
            train = Packed(
                theta[~is_held], x[~is_held], y[~is_held], dense_groups(groups[~is_held])
            )
            test = Packed(theta[is_held], x[is_held], y[is_held], dense_groups(groups[is_held]))
        else:
            train, test = all_data, None
        s, source = self._noise_floor(theta, x, y, groups)
        self._noise_norm = s
        prior0 = (
            (s if s is not None else DEFAULT_NOISE) ** 2
            if self.prior_weight == "auto"
            else float(self.prior_weight)
        )
        delta0 = HUBER_K * s if s is not None else float("inf")
        self._prior_w, self._delta = prior0, delta0
        self.residual_active, self.net = False, None
        z0 = self._z(self.p0)
        ds_train, ds_test = self._nrmse(z0, train), self._nrmse(z0, test)
        threshold = self.stall_factor * s if s is not None else self.stall_fraction * ds_train
        attempts, best = self._attempts(train, test, s, prior0, delta0, threshold)
        z = {n: v.clone().requires_grad_(True) for n, v in best[1].items()}
        self._delta, self._prior_w = best[2], best[3]
        self._write(z)
        self.n_params, self.in_dim, self.out_dim = theta.shape[1], x.shape[1], y.shape[1]
        fit_te = self._nrmse(z, test)
        report: dict[str, Any] = {
            "settings": n_groups,
            "train_settings": len(train),
            "heldout_settings": 0 if test is None else len(test),
            "rows": len(y),
            "noise_nrmse": s,
            "noise_source": source,
            "stall_threshold": threshold,
            "prior_weight": self._prior_w,
            "loss_scale": self._delta,
            "datasheet_train_nrmse": ds_train,
            "datasheet_heldout_nrmse": ds_test,
            "train_nrmse": self._nrmse(z, train),
            "heldout_nrmse": fit_te,
            "r2_vs_datasheet": 1 - fit_te**2 / ds_test**2 if test is not None else float("nan"),
            "attempts": attempts,
            "restarts": len(attempts) - 1,
        }
        if self.residual:
            report["residual"] = self._fit_residual(train, test, fit_te)
        if self.refit_all and test is not None:
            t0 = time.perf_counter()
            iters, finite = self._optimise(z, all_data, self._delta, max(self.max_iter // 2, 1))
            if finite:
                self._write(z)
            report["refit_all"] = {
                "iterations": iters,
                "seconds": time.perf_counter() - t0,
                "finite": finite,
            }
        report["final_train_nrmse"] = self._nrmse(None, all_data)
        report["fit_seconds"] = time.perf_counter() - t_start
        self.report = report
        return self

    # -- update -------------------------------------------------------------------------------
    def update(
        self, theta, x, y, groups=None, *, steps=None, append=False, centre=None
    ) -> CalibratedSurrogate:
        """Warm refit from the current parameters on these rows (or the stored rows plus
        these), ``steps`` optimiser iterations (default ``max_iter // 4``). ``centre`` is
        ignored (the model is global)."""
        if not self.is_fitted:
            return self.fit(theta, x, y, groups)
        t0 = time.perf_counter()
        theta, x, y, groups = self._check_rows(theta, x, y, groups)
        if append and self._rows is not None:
            th0, x0, y0, g0 = self._rows
            theta, x, y = (
                np.concatenate([th0, theta]),
                np.concatenate([x0, x]),
                np.concatenate([y0, y]),
            )
            groups = np.concatenate([g0, groups + g0.max() + 1])
        self._rows = (theta, x, y, groups)
        data = Packed(theta, x, y, groups)
        steps = max(self.max_iter // 4, 1) if steps is None else int(steps)
        z = self._z()
        iters, finite = self._optimise(z, data, self._delta, steps)
        if finite:
            self._write(z)
        self.report.setdefault("updates", []).append(
            {
                "settings": len(data),
                "iterations": iters,
                "finite": finite,
                "train_nrmse": self._nrmse(None, data),
                "seconds": time.perf_counter() - t0,
            }
        )
        return self

    # -- prediction ---------------------------------------------------------------------------
    def predict_with_uncertainty(
        self, theta: ArrayLike, x: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.predict(theta, x)
        return mean, torch.zeros_like(mean)

    def predict_setting(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One setting ``theta (n_params,)``, inputs ``x (batch, in_dim)`` -> ``(batch, out_dim)``
        in ``theta``'s dtype, differentiable in both: the fitted model (and residual) as a
        plain ``model(theta, x)``, the form training code takes, without the grouping of
        :meth:`predict` (float32 runs at float32 speed where the model computes in its input's dtype)."""
        pred = self.model(theta, x)
        if self.residual_active and self.net is not None:
            pred = self._with_residual(pred.to(_F64), x.to(_F64)).to(pred.dtype)
        return pred

    def predict(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """``(m, out_dim)`` in ``dtype``, differentiable in ``theta`` and ``x``."""
        theta, x = self._as_query(theta, x)
        theta, x = theta.to(_F64), x.to(_F64)
        if theta.shape[0] == 1:
            thetas, xs, back = theta, x.unsqueeze(0), None
        else:
            keys = groups_from_theta(theta.detach().cpu().numpy())
            packed = Packed(theta.detach().cpu().numpy(), np.zeros((len(keys), 0)), None, keys)
            rows = torch.as_tensor(packed.rows)
            thetas, xs = theta[rows[:, 0]], x[rows]
            back = (torch.as_tensor(keys), torch.as_tensor(position_in_group(keys)))
        pred = self._forward(None, thetas, xs)
        if self.residual_active and self.net is not None:
            pred = self._with_residual(pred, xs)
        pred = pred[0] if back is None else pred[back[0], back[1]]
        return pred.to(self.dtype)

    # -- persistence --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            residual=self.residual,
            residual_form=self.residual_form,
            optimizer=self.optimizer,
            max_iter=self.max_iter,
            tol=self.tol,
            loss=self.loss,
            noise=self.noise,
            prior_weight=self.prior_weight,
            holdout=self.holdout,
            max_restarts=self.max_restarts,
            restart_scale=self.restart_scale,
            stall_factor=self.stall_factor,
            stall_fraction=self.stall_fraction,
            refit_all=self.refit_all,
            residual_hidden=self.residual_hidden,
            residual_steps=self.residual_steps,
            residual_lr=self.residual_lr,
            residual_l2=self.residual_l2,
            residual_gate=self.residual_gate,
            residual_joint=self.residual_joint,
            adam_lr=self.adam_lr,
        )
        return cfg

    def _state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "p0": self.p0,
            "scale": self.scale,
            "y_loc": self.y_loc,
            "y_spread": self.y_spread,
            "x_loc": self.x_loc,
            "x_scale": self.x_scale,
            "delta": self._delta,
            "prior_w": self._prior_w,
            "residual_active": self.residual_active,
            "net": None if self.net is None else self.net.state_dict(),
            "report": json.dumps(self.report, default=float),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.p0, self.scale = state["p0"], state["scale"]
        self.y_loc, self.y_spread, self.x_loc, self.x_scale = (
            state[k] for k in ("y_loc", "y_spread", "x_loc", "x_scale")
        )
        self._delta, self._prior_w = float(state["delta"]), float(state["prior_w"])
        self.residual_active = bool(state["residual_active"])
        if state["net"] is not None:
            assert self.in_dim is not None and self.out_dim is not None, "loaded dimensions"
            if "knots" in state["net"]:  # by what was saved: older files hold the mlp
                self.net = MonotoneMap(state["net"]["knots"])
            else:
                self.net = ResidualNet(self.in_dim, self.out_dim, self.residual_hidden)
            self.net.load_state_dict(state["net"])
        self.report = json.loads(state["report"])

    @classmethod
    def load(cls, path: str | PathLike, model: nn.Module | None = None) -> CalibratedSurrogate:
        """Rebuild a saved calibration into ``model`` (a fresh instance of the same model class
        and shape: the file holds parameters, not code)."""
        payload = torch.load(path, weights_only=True)
        if payload.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported surrogate file format {payload.get('format')!r}")
        if payload["class"] != cls.__name__:
            raise TypeError(f"{path} holds a {payload['class']}, not a {cls.__name__}")
        obj = cls(model, **payload["config"])
        obj.n_params, obj.in_dim, obj.out_dim = payload["dims"]
        obj._load_state(payload["state"])
        return obj
