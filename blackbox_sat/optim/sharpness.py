"""Sharpness measures of a loss at a setting ``theta``, in normalized coordinates.

Everything here is measured in the coordinates SAT works in:
``u = theta / scale``, with ``scale`` the bound width (default 1). For a loss ``L(theta)`` the
functions look at ``d -> L(theta + scale * d)`` near ``d = 0``, so

* :func:`top_hessian_eigenvalue` is the largest eigenvalue of ``diag(s) H diag(s)``, with ``H``
  the Hessian of ``L`` in ``theta``. This is the ``sharpness`` figure of ``result.json``;
* :func:`worst_case_loss` is ``max L(theta + s * d)`` over ``||d||_2 <= rho``, the quantity SAT
  minimizes, and :func:`sharpness_gap` is that minus ``L(theta)``.

``loss_fn`` maps a 1-D tensor ``(n_params,)`` to a scalar tensor and must be differentiable
with torch autograd (twice, for the Hessian).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _setup(theta, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta`` as a detached 1-D float tensor, ``scale`` as a tensor of the same shape."""
    theta = torch.as_tensor(theta).detach().clone()
    if not theta.is_floating_point():
        theta = theta.to(torch.float64)
    if theta.ndim != 1:
        raise ValueError(f"theta must be 1-D (n_params,), got shape {tuple(theta.shape)}")
    s = (
        torch.ones_like(theta)
        if scale is None
        else torch.as_tensor(scale, dtype=theta.dtype, device=theta.device)
    )
    s = torch.broadcast_to(s, theta.shape).clone()
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError("scale must be finite and > 0 everywhere")
    return theta, s


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _power_iteration(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    iters: int,
    tol: float,
    shift: float = 0.0,
) -> float:
    """Dominant (largest magnitude) eigenvalue of ``H - shift * I`` by power iteration with the
    Rayleigh quotient; stops when it changes by less than ``tol`` relative."""
    v = v / torch.linalg.vector_norm(v)
    lam = None
    for _ in range(max(1, iters)):
        hv = hvp(v) - shift * v
        lam_new = float(torch.dot(v, hv))
        nrm = torch.linalg.vector_norm(hv)
        if not torch.isfinite(nrm):
            raise FloatingPointError("Hessian-vector product is not finite")
        if float(nrm) == 0.0:
            return 0.0
        v = hv / nrm
        if lam is not None and abs(lam_new - lam) <= tol * max(abs(lam_new), 1e-30):
            return lam_new
        lam = lam_new
    assert lam is not None, "the loop runs at least once"
    return lam


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    theta: torch.Tensor | np.ndarray,
    iters: int = 20,
    tol: float = 1e-3,
    scale: torch.Tensor | np.ndarray | float | None = None,
    seed: int = 0,
) -> float:
    """Largest (algebraic) eigenvalue of the Hessian of ``loss_fn`` at ``theta`` (``(n_params,)``).

    With ``scale`` ``s`` (``(n_params,)`` or scalar) it is measured in normalized coordinates:
    the Hessian of ``u -> loss_fn(s * u)``, i.e. of ``diag(s) H diag(s)``. Power iteration on
    Hessian-vector products (double backward), at most ``iters`` products, stopping when the
    Rayleigh quotient changes by less than ``tol`` relative. If the dominant eigenvalue is
    negative, a second, shifted power iteration finds the largest one. A loss with zero
    Hessian gives 0.0. Deterministic for a given ``seed`` (the random start vector).
    """
    theta, s = _setup(theta, scale)
    d = torch.zeros_like(theta, requires_grad=True)
    with torch.enable_grad():
        loss = _scalar(loss_fn(theta + s * d))
        (g,) = torch.autograd.grad(loss, d, create_graph=True)
    if not g.requires_grad:  # gradient independent of theta: the Hessian is zero
        return 0.0

    def hvp(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(g, d, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
    lam = _power_iteration(hvp, v0, iters, tol)
    if (
        lam < 0
    ):  # dominant eigenvalue negative: the largest one is lam + top eig of H - lam I (>= 0)
        lam = lam + _power_iteration(hvp, v0, iters, tol, shift=lam)
    return float(lam)


def worst_case_loss(
    loss_fn: LossFn,
    theta: torch.Tensor | np.ndarray,
    rho: float,
    scale: torch.Tensor | np.ndarray | float | None = None,
    steps: int = 10,
    n_random: int = 4,
    seed: int = 0,
) -> float:
    """Approximate ``max loss_fn(theta + s * d)`` over ``||d||_2 <= rho`` (normalized coordinates).

    ``theta`` is ``(n_params,)``, ``scale`` ``s`` is ``(n_params,)`` or scalar (default 1).
    Projected normalized-gradient ascent (``steps`` steps of length ``rho``, each projected
    back onto the ball) from the SAM point ``rho * g / ||g||`` and from ``n_random`` random
    points on the sphere; returns the largest loss seen, never less than ``loss_fn(theta)``.
    It is a lower bound on the true maximum, exact on linear losses and, up to convergence,
    on quadratics.
    """
    theta, s = _setup(theta, scale)

    def value_and_grad(d: torch.Tensor) -> tuple[float, torch.Tensor]:
        d = d.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = _scalar(loss_fn(theta + s * d))
            (g,) = torch.autograd.grad(loss, d, allow_unused=True)
        return float(loss.detach()), (torch.zeros_like(d) if g is None else g.detach())

    zero = torch.zeros_like(theta)
    best, g0 = value_and_grad(zero)
    if rho <= 0:
        return best
    starts = []
    g0n = torch.linalg.vector_norm(g0)
    if float(g0n) > 0:
        starts.append(rho * g0 / g0n)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_random):
        r = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
        starts.append(rho * r / torch.linalg.vector_norm(r))

    for d in starts:
        for k in range(steps + 1):
            f, g = value_and_grad(d)
            if f > best:  # NaN never wins
                best = f
            gn = torch.linalg.vector_norm(g)
            if k == steps or float(gn) == 0.0:
                break
            d = d + rho * g / gn
            d = d * torch.clamp(rho / torch.linalg.vector_norm(d), max=1.0)
    return float(best)


def sharpness_gap(
    loss_fn: LossFn,
    theta: torch.Tensor | np.ndarray,
    rho: float,
    scale: torch.Tensor | np.ndarray | float | None = None,
    **kwargs,
) -> float:
    """``worst_case_loss(...) - loss_fn(theta)`` (>= 0): how much the loss can rise within the
    rho-ball in normalized coordinates. ``kwargs`` go to :func:`worst_case_loss`."""
    theta_t, _ = _setup(theta, scale)
    with torch.no_grad():
        base = float(_scalar(loss_fn(theta_t)))
    return worst_case_loss(loss_fn, theta_t, rho, scale=scale, **kwargs) - base
