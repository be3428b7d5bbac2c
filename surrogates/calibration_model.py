"""The calibration model of a grey-box surrogate (:mod:`surrogates.calibrated`): its contract,
the checks, its vectorised call, rows packed by setting, and the residual network.

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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_F64 = torch.float64


def check_model(model: object) -> nn.Module:
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


class ModelCall(nn.Module):
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


class Packed:
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


class MonotoneMap(nn.Module):
    """Per output ``i``, an increasing piecewise-linear map ``f_i`` of the model's normalised
    output ``u_i``, returned as the correction ``f_i(u_i) - u_i`` (``(..., out_dim)``).

    Rule: a detector's reading is a monotone function of the power on it (gain, offset,
    compression), so the map sees only its own output and is increasing for any weights:
    its slope ``exp(log_slope)`` on each segment between ``knots (out_dim, K)`` (constant
    beyond the ends) keeps the backward pass's sign and direction per output, which a
    network on ``[y, x]`` does not. All slopes 1 and shift 0 (the start) is the identity."""

    knots: torch.Tensor

    def __init__(self, knots: torch.Tensor):
        super().__init__()
        knots = torch.as_tensor(knots, dtype=_F64)
        self.register_buffer("knots", knots.clone())
        self.log_slope = nn.Parameter(torch.zeros(knots.shape[0], knots.shape[1] + 1, dtype=_F64))
        self.shift = nn.Parameter(torch.zeros(knots.shape[0], dtype=_F64))

    @classmethod
    def from_outputs(cls, y_norm: torch.Tensor, n_knots: int = 8) -> MonotoneMap:
        """Knots at ``n_knots`` evenly spaced quantiles of each output over ``y_norm (rows,
        out_dim)``, so every segment holds data."""
        q = torch.linspace(0, 1, n_knots, dtype=_F64)
        knots = torch.quantile(y_norm.to(_F64), q, dim=0).T  # (out_dim, K)
        gap = 1e-6 * torch.arange(n_knots, dtype=_F64)  # strictly increasing on flat outputs
        return cls(torch.cummax(knots, dim=1).values + gap)

    def forward(self, y_norm: torch.Tensor, x_norm: torch.Tensor | None = None) -> torch.Tensor:
        k = self.knots.to(y_norm.dtype)
        d = y_norm.unsqueeze(-1) - k  # (..., out, K)
        width = k[:, 1:] - k[:, :-1]
        pieces = torch.cat(
            [
                d[..., :1].clamp(max=0),  # below the first knot
                torch.minimum(d[..., :-1].clamp(min=0), width),
                d[..., -1:].clamp(min=0),  # above the last
            ],
            -1,
        )
        slope = torch.exp(self.log_slope).to(y_norm.dtype)
        return k[:, 0] + self.shift.to(y_norm.dtype) + (slope * pieces).sum(-1) - y_norm


def position_in_group(keys: np.ndarray) -> np.ndarray:
    """Each row's rank among the rows of its group, in row order."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(len(keys), np.int64)
    pos[order] = np.arange(len(keys)) - starts[keys[order]]
    return pos
