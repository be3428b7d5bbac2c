"""The fit of a grey-box surrogate (:mod:`surrogates.calibrated`): its objective, optimiser,
restarts and residual network, as the base class :class:`CalibrationFit`.

The fit
-------
Rows are grouped by setting (``groups``; one ``query`` call = one setting) and packed as
``(S, batch, .)`` so that every objective evaluation is one batched forward over all settings.

- **Loss**: Huber (default), soft-L1 or mean square on outputs normalised by their spread
  (per-output std over the training rows). The Huber/soft-L1 scale is ``1.345 * s`` with
  ``s`` the normalised noise std: from ``noise=`` (output units), else from repeated
  ``(theta, x)`` rows in the data (:func:`~surrogates.design.estimate_noise`), else from the
  residuals' MAD after a least-squares first stage (then one robust refinement stage, whose
  prior weight is that scale squared).
- **Optimiser**: ``torch.optim.LBFGS`` with strong-Wolfe line search (default) or Adam.
- **Prior**: ``prior_weight * prior_loss() / n`` (``n`` measured values) is added to the
  mean loss. ``"auto"`` sets the weight to ``s^2``, which makes the objective the MAP
  estimate for Gaussian read noise of normalised std ``s`` (``s = 0.01`` when unknown).
- **Hold-out**: ``ceil(holdout * S)`` whole settings (not rows) are held out when ``S >= 4``.
  Reported: normalised RMSE (``nrmse``, in output spreads) of the datasheet model and of the
  fit, and ``r2_vs_datasheet = 1 - mse_fit / mse_datasheet`` on the held-out settings.
- **Restarts**: an attempt *stalls* when its training nRMSE stays above a threshold:
  ``stall_factor * s`` when ``s`` is known, else ``stall_fraction`` of the datasheet
  model's training nRMSE; or when its optimiser stopped within ``MIN_ITERATIONS`` (a line
  search that fails at once sits on a kink, e.g. a warp at whole-pixel alignment, rather
  than at a minimum: the freespace datasheet start stopped after 2 iterations). Then the fit restarts from the datasheet plus
  ``restart_scale * scale * N(0, 1)``, at most ``max_restarts`` times. Every attempt is
  recorded (``report["attempts"]``: start, iterations, seconds, train and held-out nRMSE,
  stalled); the best by held-out error (training error without a hold-out) is kept, then
  refit warm on all settings (``refit_all``).
- **Residual** (``residual=True``, family ``"calibrated+residual"``): after calibration, a
  learned correction is added to the frozen model's output: by default
  (``residual_form="monotone"``) an increasing piecewise-linear map of each normalised
  output alone, the form of what a physics model most often lacks at its detectors (gain,
  offset, compression), and one whose Jacobian keeps each output's direction; with
  ``"mlp"`` a small MLP on ``[model output, x]``, DAT-style, which fits more but whose
  Jacobian in ``theta`` mixes outputs freely. Both start at zero correction and their
  output is L2-penalised (``residual_l2``), so they stay near 0 when the model is right;
  the correction is kept only if it lowers the held-out error (``residual_gate``; the
  decision is in ``report["residual"]``). It is differentiable in ``theta`` through the
  model output.

"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .base import SurrogateBase
from .calibration_model import ModelCall, MonotoneMap, Packed, ResidualNet
from .dataset import groups_from_theta
from .design import estimate_noise

_F64 = torch.float64
#: Huber scale in units of the noise std (the classic 95 %-efficiency constant).
HUBER_K = 1.345
#: An attempt whose optimiser ran fewer iterations than this counts as stalled.
MIN_ITERATIONS = 10
#: Normalised noise std assumed for the prior weight when no estimate exists.
DEFAULT_NOISE = 0.01


class CalibrationFit(SurrogateBase):
    """The fitting machinery of :class:`~surrogates.calibrated.CalibratedSurrogate`, which
    sets every attribute below (options in its constructor, normalisation in ``fit``)."""

    model: nn.Module
    _call: ModelCall
    names: list[str]
    p0: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    optimizer: str
    loss: str
    max_iter: int
    tol: float
    adam_lr: float
    noise: Any
    prior_weight: float | str
    holdout: float
    max_restarts: int
    restart_scale: float
    residual_hidden: int
    residual_steps: int
    residual_lr: float
    residual_l2: float
    residual_gate: bool
    residual_joint: bool
    net: ResidualNet | MonotoneMap | None
    residual_form: str
    residual_active: bool
    y_loc: torch.Tensor
    y_spread: torch.Tensor
    x_loc: torch.Tensor
    x_scale: torch.Tensor
    _delta: float
    _prior_w: float

    # -- parameters -------------------------------------------------------------------------
    def _z(self, start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Whitened leaves ``z = (p - p0) / scale`` for the model's current values (or ``start``)."""
        params = dict(self.model.named_parameters())
        src = start if start is not None else {n: params[n].detach() for n in self.names}
        return {
            n: ((src[n] - self.p0[n]) / self.scale[n]).clone().requires_grad_(True)
            for n in self.names
        }

    def _params(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"model.{n}": self.p0[n] + self.scale[n] * z[n] for n in self.names}

    @torch.no_grad()
    def _write(self, z: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n in self.names:
            params[n].copy_(self.p0[n] + self.scale[n] * z[n].detach())

    # -- the objective ------------------------------------------------------------------------
    def _forward(self, z, thetas, x) -> torch.Tensor:
        if z is None:
            return self._call(thetas, x)
        return functional_call(self._call, self._params(z), (thetas, x))

    def _residuals(self, z, data: Packed, with_correction: bool = False):
        """Normalised residuals ``(S, B, out)`` (zeros on padding); with ``with_correction``
        also the residual network's output (normalised; None when it is off)."""
        assert data.y is not None, "residuals need measured rows"
        pred = self._forward(z, data.thetas, data.x)
        corr = None
        if self.residual_active and self.net is not None:
            corr = self._correction(pred, data.x)
            pred = pred + self.y_spread * corr
        r = (pred - data.y) / self.y_spread
        r = torch.where(data.mask[..., None], r, torch.zeros_like(r))
        return (r, corr) if with_correction else r

    def _rho(self, r: torch.Tensor, delta: float) -> torch.Tensor:
        if self.loss == "mse" or not math.isfinite(delta):
            return 0.5 * r * r
        if self.loss == "huber":
            a = r.abs()
            return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
        return delta * delta * (torch.sqrt(1 + (r / delta) ** 2) - 1)  # soft-L1

    def _objective(self, z, data: Packed, delta: float) -> torch.Tensor:
        r, corr = self._residuals(z, data, with_correction=True)
        loss = self._rho(r, delta).sum() / data.n_values
        if corr is not None:
            corr = torch.where(data.mask[..., None], corr, torch.zeros_like(corr))
            loss = loss + self.residual_l2 * (corr * corr).sum() / data.n_values
        if self._prior_w > 0:
            prior = functional_call(self._call, self._params(z), (), {"what": "prior"})
            if prior is not None:
                loss = loss + self._prior_w * prior / data.n_values
        return loss

    @torch.no_grad()
    def _nrmse(self, z, data: Packed | None) -> float:
        if data is None or len(data) == 0:
            return float("nan")
        r = self._residuals(z, data)
        return float(torch.sqrt((r * r).sum() / data.n_values))

    # -- checks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _check_outputs(self, data: Packed, out_dim: int) -> None:
        """Shape and finiteness of the model's outputs at its datasheet values."""
        assert data.y is not None, "checked against measured rows"
        name = type(self.model).__name__
        b = min(4, data.x.shape[1])
        y1 = self.model(data.thetas[0], data.x[0, :b])
        if not isinstance(y1, torch.Tensor):
            raise TypeError(
                f"the calibration model {name} returned {type(y1).__name__}, not a tensor"
            )
        if tuple(y1.shape) != (b, out_dim):
            raise ValueError(
                f"the calibration model {name} returned shape {tuple(y1.shape)} for theta "
                f"({data.thetas.shape[1]},) and x ({b}, {data.x.shape[2]}); expected ({b}, {out_dim}) "
                f"= (batch, out_dim of y)"
            )
        y = self._forward(None, data.thetas, data.x)
        if tuple(y.shape) != tuple(data.y.shape):
            raise ValueError(
                f"the calibration model's batched path returned shape {tuple(y.shape)}; expected "
                f"{tuple(data.y.shape)} = (settings, batch, out_dim)"
            )
        bad = ~torch.isfinite(y) & data.mask[..., None]
        if bad.any():
            settings = torch.nonzero(bad.any(-1).any(-1)).ravel().tolist()
            raise ValueError(
                f"the calibration model {name} returned {int(bad.sum())} non-finite (NaN/inf) outputs "
                f"at its datasheet parameters, in settings {settings[:10]}"
            )

    # -- fitting ------------------------------------------------------------------------------
    def _optimise(self, z, data: Packed, delta: float, max_iter: int) -> tuple[int, bool]:
        """Minimise the objective over ``z`` in place (and over the residual network's
        weights when it is on: a joint fit); returns (iterations, finite)."""
        leaves = list(z.values())
        if self.residual_active and self.net is not None:
            leaves += list(self.net.parameters())
        iters, chunk = 0, 25
        if self.optimizer == "lbfgs":

            def make():
                return torch.optim.LBFGS(
                    leaves,
                    lr=1.0,
                    max_iter=chunk,
                    max_eval=4 * chunk,
                    history_size=20,
                    line_search_fn="strong_wolfe",
                    tolerance_grad=1e-12,
                    tolerance_change=1e-15,
                )

            opt = make()

            def closure():
                opt.zero_grad()
                loss = self._objective(z, data, delta)
                loss.backward()
                return loss

            with torch.no_grad():
                prev = float(self._objective(z, data, delta))
            while iters < max_iter:
                step = min(chunk, max_iter - iters)
                opt.param_groups[0].update(max_iter=step, max_eval=4 * step)
                start = opt.state[opt._params[0]].get("n_iter", 0)
                opt.step(closure)
                done = opt.state[opt._params[0]].get("n_iter", 0) - start
                iters += max(done, 1)
                with torch.no_grad():
                    cur = float(self._objective(z, data, delta))
                if not math.isfinite(cur):
                    return iters, False
                if prev - cur <= self.tol * abs(prev):  # no progress over this chunk
                    break
                if (
                    done < step
                ):  # stopped early (line search or tolerance): continue with fresh memory
                    opt = make()
                prev = cur
            return iters, True
        opt = torch.optim.Adam(leaves, lr=self.adam_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(max_iter, 1))
        for iters in range(1, max_iter + 1):
            opt.zero_grad()
            loss = self._objective(z, data, delta)
            if not torch.isfinite(loss):
                return iters, False
            loss.backward()
            opt.step()
            sched.step()
        return max_iter, True

    def _noise_floor(self, theta, x, y, groups_all) -> tuple[float | None, str]:
        """Normalised noise std ``s`` and where it came from."""
        spread = self.y_spread.numpy()
        if self.noise is not None:
            sd = np.broadcast_to(np.asarray(self.noise, float), spread.shape)
            return float(np.sqrt(np.mean((sd / spread) ** 2))), "given"
        keys = groups_from_theta(np.concatenate([theta, x], 1))
        if np.bincount(keys).max() > 1:
            sd = estimate_noise(y, keys)
            return float(np.sqrt(np.mean((sd / spread) ** 2))), "repeats"
        return None, "none"

    def _split(self, n_groups: int) -> np.ndarray:
        """Held-out setting ids."""
        if self.holdout <= 0 or n_groups < 4:
            return np.zeros(0, np.int64)
        n_out = min(n_groups - 2, max(1, math.ceil(self.holdout * n_groups)))
        return np.sort(
            np.random.default_rng([self.seed, 11]).choice(n_groups, n_out, replace=False)
        )

    def _attempts(
        self,
        train: Packed,
        test: Packed | None,
        s: float | None,
        prior0: float,
        delta0: float,
        threshold: float,
    ) -> tuple[list[dict[str, Any]], tuple]:
        """Fit from the datasheet, then from perturbed starts while attempts stall (see the
        module docstring); returns every attempt's record and the best ``(score, z, delta,
        prior weight)``."""
        gen = torch.Generator().manual_seed(self.seed)
        attempts, best = [], None
        for k in range(self.max_restarts + 1):
            t0 = time.perf_counter()
            self._prior_w, self._delta = prior0, delta0
            z = self._z(self.p0)
            if k:
                with torch.no_grad():
                    for n in self.names:
                        z[n].add_(
                            self.restart_scale * torch.randn(z[n].shape, generator=gen, dtype=_F64)
                        )
            iters, finite = self._optimise(z, train, self._delta, self.max_iter)
            if finite and s is None and self.loss != "mse":
                # Robust stage: scale from the least-squares residuals' MAD.
                r = self._residuals(z, train).detach()[train.mask]
                s_hat = 1.4826 * max(float(torch.median(torch.abs(r - torch.median(r)))), 1e-12)
                self._delta = HUBER_K * s_hat
                if self.prior_weight == "auto":  # MAP weight for the residuals' own noise level
                    self._prior_w = s_hat**2
                more, finite = self._optimise(z, train, self._delta, max(self.max_iter // 4, 1))
                iters += more
            tr = self._nrmse(z, train) if finite else float("nan")
            te = self._nrmse(z, test) if finite else float("nan")
            stalled = not finite or not tr <= threshold or iters < MIN_ITERATIONS
            attempts.append(
                {
                    "start": "datasheet" if k == 0 else f"perturbed {k}",
                    "iterations": iters,
                    "seconds": time.perf_counter() - t0,
                    "train_nrmse": tr,
                    "heldout_nrmse": te,
                    "stalled": stalled,
                }
            )
            score = te if test is not None else tr
            if finite and (best is None or score < best[0]):
                best = (
                    score,
                    {n: v.detach().clone() for n, v in z.items()},
                    self._delta,
                    self._prior_w,
                )
            if not stalled:
                break
        if best is None:
            raise ValueError(
                "every calibration attempt became non-finite (NaN/inf loss); check the model for "
                "singular values of its parameters"
            )
        return attempts, best

    # -- residual -----------------------------------------------------------------------------
    def _correction(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The residual network's output, in output spreads."""
        assert self.net is not None, "the residual network is built first"
        return self.net(
            (pred - self.y_loc) / self.y_spread, (x.to(_F64) - self.x_loc) / self.x_scale
        )

    def _with_residual(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pred + self.y_spread * self._correction(pred, x)

    def _train_residual(self, data: Packed, steps: int) -> None:
        net = self.net
        assert net is not None and data.y is not None, "a built network and measured rows"
        with torch.no_grad():
            base = self._forward(None, data.thetas, data.x)[data.mask]
        x, y = data.x[data.mask], data.y[data.mask]
        yn, xn, target = (
            (base - self.y_loc) / self.y_spread,
            (x - self.x_loc) / self.x_scale,
            (y - base) / self.y_spread,
        )
        opt = torch.optim.Adam(net.parameters(), lr=self.residual_lr)
        delta = self._delta if math.isfinite(self._delta) else float("inf")
        for _ in range(steps):
            opt.zero_grad()
            r = net(yn, xn)
            loss = self._rho(r - target, delta).mean() + self.residual_l2 * (r * r).mean()
            loss.backward()
            opt.step()

    def _fit_residual(self, train: Packed, test: Packed | None, base_te: float) -> dict:
        t0 = time.perf_counter()
        before = {n: v.detach().clone() for n, v in self._z().items()}
        torch.manual_seed(self.seed)
        assert self.in_dim is not None and self.out_dim is not None, "fitted dimensions"
        if self.residual_form == "monotone":
            with torch.no_grad():
                base = self._forward(None, train.thetas, train.x)[train.mask]
            self.net = MonotoneMap.from_outputs((base - self.y_loc) / self.y_spread)
        else:
            self.net = ResidualNet(self.in_dim, self.out_dim, self.residual_hidden)
        self._train_residual(train, self.residual_steps)
        self.residual_active = True
        joint = {}
        if self.residual_joint:
            # Joint refinement: the model's parameters can move back towards the physics once
            # the network carries what the model lacks.
            z = self._z()
            iters, finite = self._optimise(z, train, self._delta, max(self.max_iter // 2, 1))
            if finite:
                self._write(z)
            joint = {"joint_iterations": iters}
        te = self._nrmse(None, test)
        keep = not self.residual_gate or test is None or te < base_te
        if not keep:
            self.residual_active = False
            self._write(before)
        return {
            **joint,
            "heldout_nrmse": te,
            "heldout_nrmse_without": base_te,
            "kept": keep,
            "train_nrmse": self._nrmse(None, train),
            "seconds": time.perf_counter() - t0,
        }
