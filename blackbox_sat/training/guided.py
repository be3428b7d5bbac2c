"""Guided evolution strategies: random-direction gradient estimates stretched along a guide.

Maheswaranathan, Metz, Tucker, Choi, Sohl-Dickstein, "Guided evolutionary strategies",
ICML 2019. Directions are drawn from ``N(0, n Sigma)`` with

    Sigma = alpha / n * I + (1 - alpha) / k * U U^T,

``U (n, k)`` an orthonormal basis of the last ``k`` guide gradients (here the surrogate's
physics-aware gradients), and each direction ``d`` is measured as an antithetic pair on one
minibatch: ``g = (L(u + c d) - L(u - c d)) / (2 c) * d``. ``E[d d^T] = n Sigma`` has trace
``n``, as the Rademacher directions of :mod:`.refine` (so ``c`` and the step sizes keep
their units), and ``alpha = 1`` is plain Gaussian random search.

**Bias.** The basis is built from gradients computed *before* the pair is drawn, so given
the past, ``E[g] = n Sigma grad L_c`` exactly up to the smoothing of ``L`` by the
perturbation (``O(c^2)``): a descent direction whatever the guide, since ``Sigma >= alpha / n
I`` is positive definite. A guide orthogonal to the gradient leaves ``E[g] = alpha grad L``
(pointing exactly along the gradient); a guide spanning it gives ``E[g] = (alpha + (1 -
alpha) n / k) grad L``, ``n / k`` times more signal per pair than isotropic search. A
whitened variant (multiplying by ``Sigma^-1``) would be unbiased for ``grad L`` itself, but
its noise outside the guide grows by ``n / alpha`` and defeats the guide, so it is not used.

The guide gradient of a step comes free with its pair: the mean of the two measured
outputs is the outputs at ``u`` to ``O(c^2)``, and the surrogate's vector-Jacobian product
of their loss gradient is the physics-aware gradient of :mod:`.physics_aware` (real outputs,
the surrogate's Jacobian only).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from .context import MINIBATCH, TrainContext
from .objectives import DeviceObjective
from .physics_aware import surrogate_vjp
from .pnn import readout_loss


class Guide:
    """The last ``k`` guide gradients ``(n,)`` and the directions they shape."""

    def __init__(self, n: int, k: int = 4, alpha: float = 0.5):
        if not (0 < alpha <= 1 and k >= 1):
            raise ValueError("need 0 < alpha <= 1 and k >= 1")
        self.n, self.k, self.alpha = n, k, alpha
        self.grads: deque[np.ndarray] = deque(maxlen=k)
        self._basis: np.ndarray | None = None

    def add(self, grad: np.ndarray | None) -> None:
        """Remember a guide gradient (normalized units); a zero or missing one is skipped."""
        if grad is not None and np.all(np.isfinite(grad)) and np.linalg.norm(grad) > 0:
            self.grads.append(np.asarray(grad, float).copy())
            self._basis = None

    def basis(self) -> np.ndarray:
        """``(n, k')`` orthonormal basis of the remembered gradients (``k' <= k``)."""
        if self._basis is None:
            if not self.grads:
                self._basis = np.zeros((self.n, 0))
            else:
                q, r = np.linalg.qr(np.stack(self.grads, 1))
                keep = np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()
                self._basis = q[:, keep]
        return self._basis

    def direction(self, rng: np.random.Generator) -> np.ndarray:
        """One direction ``(n,)`` with ``E[d d^T] = n Sigma`` (``alpha = 1`` without a guide)."""
        u = self.basis()
        k = u.shape[1]
        if k == 0:
            return rng.standard_normal(self.n)
        return np.sqrt(self.alpha) * rng.standard_normal(self.n) + np.sqrt(
            (1 - self.alpha) * self.n / k
        ) * (u @ rng.standard_normal(k))


def guide_gradient(
    ctx: TrainContext, surrogate, theta: np.ndarray, x: np.ndarray, y: np.ndarray, idx
) -> np.ndarray:
    """The surrogate's physics-aware gradient ``(n_params,)`` (device units) of the loss of the
    measured outputs ``y (B, out_dim)`` of inputs ``x`` at ``theta``: costs no setting."""
    yt = torch.as_tensor(y).requires_grad_(True)
    (g_y,) = torch.autograd.grad(readout_loss(ctx.pnn, yt, ctx.y_train[idx]), yt)
    return surrogate_vjp(surrogate, theta, torch.as_tensor(x), g_y)


class GuidedSteps:
    """Guided-ES steps that keep their state across the pipeline's rounds: the guide, an Adam
    on the normalized setting, and the data the pairs add for the surrogate.

    Each step measures one antithetic pair ``u +- c d`` on one minibatch (2 settings), takes
    an Adam step on ``g`` with the round's step size, clips it to the round's box and
    projects it; both settings' outputs join ``data`` as surrogate rows.
    """

    def __init__(self, ctx: TrainContext, c: float, k: int, alpha: float, salt: int = 0x6E5):
        self.ctx, self.c = ctx, c
        self.obj = DeviceObjective(ctx, purpose="train")
        self.guide = Guide(self.obj.n, k, alpha)
        self.rng = np.random.default_rng([int(ctx.seed), salt])
        self.u = torch.zeros(self.obj.n, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.u], lr=1e-3)
        self.batches = ctx.minibatches(min(MINIBATCH, len(ctx.y_train)))
        self.losses: list[float] = []

    def run(
        self,
        theta: np.ndarray,
        n: int,
        lr: float,
        surrogate=None,
        data=None,
        box: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``n`` steps from ``theta (n_params,)``; returns the new setting. ``surrogate`` gives
        the guide (none: isotropic search); ``data`` (a :class:`.surrogate_choice.Dataset`)
        receives the measured rows."""
        obj, c = self.obj, self.c
        u = obj.keep(obj.to_u(theta))
        self.opt.param_groups[0]["lr"] = lr
        for _ in range(n):
            idx = next(self.batches)
            d = self.guide.direction(self.rng)
            thetas = [obj.to_theta(u + c * d), obj.to_theta(u - c * d)]
            (lp, yp), (lm, ym) = (obj.loss_outputs(t, idx) for t in thetas)
            x = obj.inputs(idx)
            if data is not None:
                for t, y in zip(thetas, (yp, ym)):
                    data.add(t, x, y)
            if surrogate is not None:
                g = guide_gradient(self.ctx, surrogate, obj.to_theta(u), x, (yp + ym) / 2, idx)
                self.guide.add(g * obj.scale)
            with torch.no_grad():
                self.u.copy_(torch.as_tensor(u))
            self.u.grad = torch.as_tensor((lp - lm) / (2 * c) * d)
            self.opt.step()
            u = self.u.detach().numpy().copy()
            if box is not None:
                u = np.clip(u, box[0], box[1])
            u = obj.keep(u)
            self.losses.append((lp + lm) / 2)
            self.ctx.snapshot(obj.to_theta(u))
        return obj.to_theta(u)
