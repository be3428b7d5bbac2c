"""Device objectives: every measured training loss and accuracy, in one place.

A loss value is a measurement: one setting programmed through ``ctx.device.query`` (counted,
charged, logged), at most :data:`~.context.MINIBATCH` training inputs, and the PNN readout's
cross-entropy (:func:`.pnn.readout_loss`) computed on the host.

- :func:`device_loss`: the loss at one setting *with* ``dL/dy`` for physics-aware steps;
- :class:`DeviceObjective`: plain losses (one setting, several on one minibatch, in device or
  normalized units) and chunked accuracy, for the zeroth-order rules;
- :func:`check_minibatch` and :func:`check_loss`: the fixed minibatch on which the pipeline
  accepts or rejects moves, and its loss (one setting).
"""

from __future__ import annotations

import numpy as np
import torch

from .context import MINIBATCH, TrainContext
from .pnn import readout_correct, readout_loss


def device_loss(
    ctx: TrainContext,
    theta: np.ndarray,
    idx: np.ndarray,
    purpose: str = "train",
    x: torch.Tensor | None = None,
    digital: bool = True,
) -> tuple[float, torch.Tensor, torch.Tensor, np.ndarray]:
    """Measure ``theta`` on training rows ``idx``: (loss, dL/dy, device inputs, raw outputs).

    With ``digital`` and a hybrid PNN, the readout's gradient is accumulated in ``.grad``."""
    if x is None:
        x = ctx.pnn.device_inputs(ctx.f_train[idx])
    y = ctx.device.query(theta, x.detach().numpy(), purpose=purpose)
    yt = torch.as_tensor(y).requires_grad_(True)
    loss = readout_loss(ctx.pnn, yt, ctx.y_train[idx])
    digital = digital and ctx.pnn.trainable
    (g_y,) = torch.autograd.grad(loss, yt, retain_graph=digital)
    if digital:  # the digital readout's exact gradient from the real outputs
        loss.backward(inputs=list(ctx.pnn.readout.parameters()))
    return float(loss.detach()), g_y, x, y


class DeviceObjective:
    """Measured training loss of settings on the device, in device or normalized units.

    ``loss(theta, idx)``: one setting (``theta`` in device units, projected into the
    domain), inputs ``ctx.f_train[idx]`` (at most ``MINIBATCH``), cross-entropy of
    ``ctx.pnn(y)``. ``losses(thetas, idx)``: several settings on the same minibatch
    (common random numbers). ``*_u`` variants take normalized coordinates.
    """

    def __init__(self, ctx: TrainContext, purpose: str = "refine"):
        self.ctx, self.purpose = ctx, purpose
        self.info = ctx.info
        self.scale = np.asarray(self.info.scale, float)
        self.n = self.info.n_params
        self.periodic = np.asarray(self.info.periodic, bool)
        self._u_low = np.where(self.periodic, -np.inf, self.info.low / self.scale)
        self._u_high = np.where(self.periodic, np.inf, self.info.high / self.scale)
        self._cache: tuple | None = None

    # --- coordinates ------------------------------------------------------------------
    def to_u(self, theta) -> np.ndarray:
        return np.asarray(theta, float) / self.scale

    def to_theta(self, u) -> np.ndarray:
        """Device setting for normalized ``u``: wrap periodic parameters, clip the others."""
        return self.info.project(np.asarray(u, float) * self.scale)

    def keep(self, u) -> np.ndarray:
        """Iterate kept inside the domain: non-periodic coordinates clipped, periodic
        ones left unwrapped (so that averages of iterates make sense)."""
        return np.clip(u, self._u_low, self._u_high)

    # --- cost -------------------------------------------------------------------------
    def cost(self, batch: int = MINIBATCH) -> int:
        """Settings one loss evaluation on ``batch`` inputs costs (``max_batch`` splits)."""
        return self.ctx.device.settings_needed(batch)

    # --- measurements -----------------------------------------------------------------
    def _batch(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 1 or len(idx) < 1 or len(idx) > MINIBATCH:
            raise ValueError(
                f"idx must be 1-D with 1..{MINIBATCH} training indices, got shape {idx.shape}"
            )
        if self._cache is None or not np.array_equal(self._cache[0], idx):
            x = self.ctx.device_inputs(self.ctx.f_train[idx])
            self._cache = (idx.copy(), x, torch.as_tensor(self.ctx.y_train[idx]))
        return self._cache[1], self._cache[2]

    def loss(self, theta, idx, purpose: str | None = None) -> float:
        return self.loss_outputs(theta, idx, purpose)[0]

    def loss_outputs(self, theta, idx, purpose: str | None = None) -> tuple[float, np.ndarray]:
        """The loss of one setting and the outputs ``(B, out_dim)`` it was computed from."""
        x, labels = self._batch(idx)
        y = self.ctx.device.query(self.info.project(theta), x, purpose=purpose or self.purpose)
        with torch.no_grad():
            return float(readout_loss(self.ctx.pnn, y, labels)), np.asarray(y)

    def inputs(self, idx) -> np.ndarray:
        """The device inputs ``(B, in_dim)`` of training rows ``idx`` (cached)."""
        return self._batch(idx)[0]

    def losses(self, thetas, idx, purpose: str | None = None) -> np.ndarray:
        return np.array([self.loss(t, idx, purpose) for t in thetas])

    def loss_u(self, u, idx, purpose: str | None = None) -> float:
        return self.loss(self.to_theta(u), idx, purpose)

    def losses_u(self, us, idx, purpose: str | None = None) -> np.ndarray:
        return np.array([self.loss_u(u, idx, purpose) for u in us])

    def accuracy(self, theta, split: str = "val", purpose: str = "train") -> float:
        """Accuracy on ``split`` measured in chunks of at most ``MINIBATCH`` inputs, each a
        setting; ``purpose='train'`` is charged (model selection on validation)."""
        f, y = (
            (self.ctx.f_val, self.ctx.y_val)
            if split == "val"
            else (self.ctx.f_train, self.ctx.y_train)
        )
        theta = self.info.project(theta)
        correct = 0
        for i in range(0, len(y), MINIBATCH):
            out = self.ctx.device.query(
                theta, self.ctx.device_inputs(f[i : i + MINIBATCH]), purpose=purpose
            )
            correct += readout_correct(self.ctx.pnn, out, y[i : i + MINIBATCH])
        return correct / len(y)

    def accuracy_cost(self, split: str = "val") -> int:
        n = len(self.ctx.y_val if split == "val" else self.ctx.y_train)
        return sum(self.cost(min(MINIBATCH, n - i)) for i in range(0, n, MINIBATCH))


def check_minibatch(ctx: TrainContext, salt: int = 5) -> np.ndarray:
    """The fixed check minibatch ``(min(MINIBATCH, n_train),)`` of training rows, drawn once
    per seed so that every accept test of a run compares losses on the same inputs."""
    n = len(ctx.y_train)
    return np.random.default_rng([ctx.seed, salt]).choice(n, min(MINIBATCH, n), replace=False)


def check_loss(ctx: TrainContext, theta: np.ndarray, idx: np.ndarray) -> float:
    """Device loss of ``theta (n_params,)`` on the check rows ``idx``: one setting."""
    return device_loss(ctx, theta, idx, digital=False)[0]


def check_outputs(
    ctx: TrainContext, theta: np.ndarray, idx: np.ndarray
) -> tuple[float, np.ndarray]:
    """:func:`check_loss` and the measured outputs ``(B, out_dim)`` it came from."""
    loss, _, _, y = device_loss(ctx, theta, idx, digital=False)
    return loss, np.asarray(y)


def predicted_loss(
    ctx: TrainContext,
    surrogate,
    idx: np.ndarray,
    theta_from: np.ndarray,
    y_from: np.ndarray,
    theta_to: np.ndarray,
) -> float:
    """The surrogate's prediction of the loss on rows ``idx`` at ``theta_to``: the outputs
    ``y_from (B, out_dim)`` measured at ``theta_from`` plus the predicted change, so only the
    surrogate's error on the change enters (its bias cancels). Costs no setting."""
    x = torch.as_tensor(ctx.device_inputs(ctx.f_train[idx]), dtype=torch.float32)
    with torch.no_grad():
        f_to, f_from = (
            surrogate.predict(torch.as_tensor(t, dtype=torch.float32), x).double()
            for t in (theta_to, theta_from)
        )
        return float(
            readout_loss(ctx.pnn, torch.as_tensor(y_from) + f_to - f_from, ctx.y_train[idx])
        )
