"""Physics-aware steps on a surrogate, with the state the pipeline's rounds share.

Used by the pipeline's surrogate rounds and by ``pat`` (:mod:`.pipeline`): device forward,
surrogate backward (:mod:`.physics_aware`), Adam in normalized coordinates, anchored steps
between settings, the measured rows kept as training data for the surrogate's refits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .context import MINIBATCH, TrainContext
from .physics_aware import Anchors, device_step
from .surrogate_choice import Dataset


class SurrogateSteps:
    """Physics-aware steps on the surrogate, the state they share across rounds.

    Holds the current setting ``theta (n_params,)``, its normalized copy ``u`` that Adam
    moves (step size ``lr_factor * radius``, so steps match the trust region), the minibatch
    stream, the anchors and the training data the steps add. Used by the pipeline's rounds
    and by ``pat``.
    """

    def __init__(self, ctx: TrainContext, cfg: Any, surrogate, data: Dataset):
        self.ctx, self.cfg, self.surrogate, self.data = ctx, cfg, surrogate, data
        self.theta = ctx.theta0.copy()
        self.u = torch.tensor(self.theta / ctx.info.scale, requires_grad=True)
        self.opt = torch.optim.Adam([self.u], lr=self.step_size(cfg.radius))
        if ctx.pnn.trainable:
            self.opt.add_param_group({"params": list(ctx.pnn.parameters()), "lr": 0.01})
        self.batches = ctx.minibatches(min(MINIBATCH, len(ctx.y_train)))
        self.anchors = Anchors(len(ctx.y_train), ctx.info.out_dim)
        self.per_step = 2 if (cfg.rho > 0 and cfg.ascent == "device") else 1
        self.history: list[dict] = []

    def step_size(self, radius: float) -> float:
        return self.cfg.lr if self.cfg.lr else self.cfg.lr_factor * radius

    def set_radius(self, radius: float) -> None:
        """Scale the step size of ``theta`` (not of the digital layers) to a new radius."""
        self.opt.param_groups[0]["lr"] = self.step_size(radius)

    def affordable(self, reserve: int) -> int:
        """Steps the budget left allows, keeping ``reserve`` settings aside."""
        return (self.ctx.settings_left() - reserve) // self.per_step

    def reset(self, theta: np.ndarray) -> None:
        """Return to ``theta`` (a rejected move); Adam's moments are kept."""
        self.theta = theta.copy()
        with torch.no_grad():
            self.u.copy_(torch.as_tensor(self.theta / self.ctx.info.scale))

    def run(self, n: int, rho: float, box=None, inner: int = 0) -> None:
        """``n`` device steps, each followed by ``inner`` anchored steps that cost no setting,
        every move clipped to ``box`` (normalized ``(lo, hi)``) when given."""
        ctx, cfg = self.ctx, self.cfg
        for _ in range(n):
            idx = next(self.batches)
            self.opt.zero_grad()
            before = self.theta
            self.theta, step = device_step(
                ctx, self.theta, idx, self.surrogate, self.opt, self.u, self.anchors,
                self.batches, inner, rho=rho, ascent=cfg.ascent, adaptive=cfg.adaptive, box=box,
            )  # fmt: skip
            if cfg.learn_from_steps and step.x is not None and step.y is not None:
                self.data.add(before, step.x, step.y)
            self.history.append({"settings": ctx.device.settings_used, "loss": step.loss})
            ctx.snapshot(self.theta)

    def refit(self, window: int, steps: int, scratch: bool = False) -> None:
        """Refit the surrogate on the last ``window`` settings: warm for ``steps`` steps
        around the current point, or ``scratch`` (new normalisation and weights)."""
        th, x, y, g = self.data.arrays(window)
        if scratch:
            self.surrogate.fit(th, x, y, g)
        else:
            self.surrogate.update(th, x, y, g, steps=steps, centre=self.theta)
        self.anchors.invalidate()
