"""Grey-box calibration ("digital twin"): fit a physics model's unknown error parameters.

The user knows the circuit's structure and writes it as a *calibration model*; the fit
identifies the chip's errors from measured outputs. Families ``"calibrated"`` and
``"calibrated+residual"`` (:class:`CalibratedSurrogate`).

Calibration model contract
--------------------------
A ``torch.nn.Module`` ``model(theta (n_params,), x (batch, in_dim)) -> (batch, out_dim)``:

- its ``nn.Parameter`` s are the unknown error parameters, started at their datasheet values
  (the values they hold when :meth:`CalibratedSurrogate.fit` is first called);
- optional ``batched(thetas (S, n_params), x (S, batch, in_dim)) -> (S, batch, out_dim)``: all
  settings in one pass. Without it the fit vectorises ``forward`` over settings with
  ``torch.vmap`` (a Python loop if vmap cannot trace the model);
- optional ``prior_loss() -> scalar``: a negative log-prior of the parameters (e.g. a Gaussian
  around the datasheet); added with weight ``prior_weight`` (below);
- optional ``parameter_scale() -> {name: tensor}``: each parameter's typical error size. The
  fit optimises whitened ``z = (p - p0) / scale`` (L-BFGS is sensitive to scaling: phases in
  rad and resonance offsets in nm differ by orders of magnitude in effect) and perturbs
  restarts by ``restart_scale * scale``. Without it every scale is 1.

The models of the built-in simulators (``sim.calibration_model()``) have all three; their
``sim.calibration_truth()`` gives the chip's true values (``model.load_truth(truth)``).

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
  model's training nRMSE. Then the fit restarts from the datasheet plus
  ``restart_scale * scale * N(0, 1)``, at most ``max_restarts`` times. Every attempt is
  recorded (``report["attempts"]``: start, iterations, seconds, train and held-out nRMSE,
  stalled); the best by held-out error (training error without a hold-out) is kept, then
  refit warm on all settings (``refit_all``).
- **Residual** (``residual=True``, family ``"calibrated+residual"``): after calibration, a small
  MLP on ``[model output, x]`` (both normalised) adds a correction to the frozen model's
  output, DAT-style. Its last layer starts at zero and its output is L2-penalised
  (``residual_l2``), so it stays near 0 when the model is right; it is kept only if it
  lowers the held-out error (``residual_gate``; the decision is in ``report["residual"]``).
  It is differentiable in ``theta`` through the model output.

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
import math
import time
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .base import _FORMAT_VERSION, SurrogateBase
from .dataset import groups_from_theta
from .design import estimate_noise
from .protocol import ArrayLike

_F64 = torch.float64
#: Huber scale in units of the noise std (the classic 95 %-efficiency constant).
HUBER_K = 1.345
#: Normalised noise std assumed for the prior weight when no estimate exists.
DEFAULT_NOISE = 0.01


def _check_model(model: object) -> nn.Module:
    """``model`` itself once it is a usable calibration model; raises otherwise."""
    if model is None:
        raise TypeError(
            "a calibrated surrogate needs model=...: a torch.nn.Module model(theta, x) -> y whose "
            "parameters are the unknown errors (e.g. sim.calibration_model()); a saved one is "
            "reloaded with CalibratedSurrogate.load(path, model=...)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the calibration model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"the calibration model {type(model).__name__} has no nn.Parameter (with requires_grad): "
            "nothing to identify; register the unknown error parameters as nn.Parameter"
        )
    return model


class _Call(nn.Module):
    """Wraps the user's model so that ``functional_call`` can substitute its parameters for
    the batched forward and for the prior alike."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.native = callable(getattr(model, "batched", None))
        self.use_vmap = True

    def forward(self, thetas=None, x=None, what: str = "y"):
        if what == "prior":
            prior = getattr(self.model, "prior_loss", None)
            return prior() if callable(prior) else None
        batched = getattr(self.model, "batched", None)  # the user model's optional method
        if self.native and callable(batched):
            return batched(thetas, x)
        if self.use_vmap:
            try:
                return torch.vmap(self.model)(thetas, x)
            except Exception:
                self.use_vmap = False
        return torch.stack([self.model(t, xx) for t, xx in zip(thetas, x)])


class _Packed:
    """Rows grouped by setting: ``thetas (S, P)``, ``x (S, B, in)``, ``y (S, B, out)``, ``mask (S, B)``."""

    def __init__(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray | None, groups: np.ndarray):
        n_groups = int(groups.max()) + 1
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups, minlength=n_groups)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        width = int(counts.max())
        pos = np.arange(width)[None, :]
        valid = pos < counts[:, None]
        idx = order[starts[:, None] + np.where(valid, pos, 0)]  # (S, B) row indices
        self.rows, self.mask = idx, torch.as_tensor(valid)
        first = order[starts]
        thetas = theta[first]
        diff = np.abs(theta - thetas[groups]).max(axis=1)
        if np.any(diff > 0):
            bad = int(groups[np.argmax(diff)])
            raise ValueError(
                f"rows of setting (group) {bad} have different theta: each group must be one setting"
            )
        self.thetas = torch.as_tensor(thetas, dtype=_F64)
        self.x = torch.as_tensor(x[idx], dtype=_F64)
        self.y = None if y is None else torch.as_tensor(y[idx], dtype=_F64)
        self.n_values = int(valid.sum()) * (0 if y is None else y.shape[1])

    def __len__(self) -> int:
        return int(self.thetas.shape[0])


class ResidualNet(nn.Module):
    """``r = MLP([y_model, x])``, normalised units, last layer initialised at zero."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim + out_dim, hidden, dtype=_F64),
            nn.SiLU(),
            nn.Linear(hidden, hidden, dtype=_F64),
            nn.SiLU(),
            nn.Linear(hidden, out_dim, dtype=_F64),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, y_norm: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([y_norm, x_norm], -1))


class CalibratedSurrogate(SurrogateBase):
    """Grey-box calibration of ``model`` (see the module docstring for the contract and the fit).

    Args:
        model: the calibration model (``nn.Module``), parameters at datasheet values.
        residual: add the learned output correction (``"calibrated+residual"``).
        optimizer: ``"lbfgs"`` (default) or ``"adam"``.
        max_iter: L-BFGS iterations (or Adam steps) per attempt.
        tol: stop an attempt when a chunk of 25 iterations improves the loss by less than
            this fraction (an L-BFGS run that stops early but made progress is resumed with
            fresh memory).
        loss: ``"huber"``, ``"soft_l1"`` or ``"mse"``.
        noise: read-noise std in output units (scalar or ``(out_dim,)``), if known.
        prior_weight: ``"auto"`` (MAP, see above), a float, or 0 for none.
        holdout: share of settings held out (0: none).
        max_restarts, restart_scale, stall_factor, stall_fraction: restarts (see above).
        refit_all: after choosing the best attempt, refit warm on all settings.
        residual_hidden, residual_steps, residual_lr, residual_l2, residual_gate,
            residual_joint: the residual network's width, Adam steps and rate, output
            penalty, the rule that keeps it only if it lowers the held-out error, and a joint
            L-BFGS refinement of model and network after the network's own fit.
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
        checked = _check_model(model)
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if loss not in ("huber", "soft_l1", "mse"):
            raise ValueError(f"loss must be 'huber', 'soft_l1' or 'mse', got {loss!r}")
        self.model = checked.to(_F64)
        self._call = _Call(self.model)
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
        self.net: ResidualNet | None = None
        self.residual_active = False
        self.report: dict[str, Any] = {}
        self._rows: tuple[np.ndarray, ...] | None = None
        self._delta = 1.0
        self._noise_norm: float | None = None

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

    def identified(self) -> dict[str, np.ndarray]:
        """The fitted parameters, ``{name: array}`` in the model's units."""
        return {
            n: p.detach().double().numpy().copy()
            for n, p in self.model.named_parameters()
            if n in self.names
        }

    # -- the objective ------------------------------------------------------------------------
    def _forward(self, z, thetas, x) -> torch.Tensor:
        if z is None:
            return self._call(thetas, x)
        return functional_call(self._call, self._params(z), (thetas, x))

    def _residuals(self, z, data: _Packed, with_correction: bool = False):
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

    def _objective(self, z, data: _Packed, delta: float) -> torch.Tensor:
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
    def _nrmse(self, z, data: _Packed | None) -> float:
        if data is None or len(data) == 0:
            return float("nan")
        r = self._residuals(z, data)
        return float(torch.sqrt((r * r).sum() / data.n_values))

    # -- checks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _check_outputs(self, data: _Packed, out_dim: int) -> None:
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
    def _optimise(self, z, data: _Packed, delta: float, max_iter: int) -> tuple[int, bool]:
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
        all_data = _Packed(theta, x, y, groups)
        self._check_outputs(all_data, y.shape[1])
        if held.size:
            train = _Packed(theta[~is_held], x[~is_held], y[~is_held], _dense(groups[~is_held]))
            test = _Packed(theta[is_held], x[is_held], y[is_held], _dense(groups[is_held]))
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
            stalled = not finite or not tr <= threshold
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

    # -- residual -----------------------------------------------------------------------------
    def _correction(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The residual network's output, in output spreads."""
        assert self.net is not None, "the residual network is built first"
        return self.net(
            (pred - self.y_loc) / self.y_spread, (x.to(_F64) - self.x_loc) / self.x_scale
        )

    def _with_residual(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pred + self.y_spread * self._correction(pred, x)

    def _train_residual(self, data: _Packed, steps: int) -> None:
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

    def _fit_residual(self, train: _Packed, test: _Packed | None, base_te: float) -> dict:
        t0 = time.perf_counter()
        before = {n: v.detach().clone() for n, v in self._z().items()}
        torch.manual_seed(self.seed)
        assert self.in_dim is not None and self.out_dim is not None, "fitted dimensions"
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
        data = _Packed(theta, x, y, groups)
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
            packed = _Packed(theta.detach().cpu().numpy(), np.zeros((len(keys), 0)), None, keys)
            rows = torch.as_tensor(packed.rows)
            thetas, xs = theta[rows[:, 0]], x[rows]
            back = (torch.as_tensor(keys), torch.as_tensor(_position_in_group(keys)))
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


def _dense(groups: np.ndarray) -> np.ndarray:
    from .dataset import dense_groups

    return dense_groups(groups)


def _position_in_group(keys: np.ndarray) -> np.ndarray:
    """Each row's rank among the rows of its group, in row order."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(len(keys), np.int64)
    pos[order] = np.arange(len(keys)) - starts[keys[order]]
    return pos
