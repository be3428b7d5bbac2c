"""Physics-aware gradients: the forward pass on the device, the backward pass through a model.

One training step measures a minibatch on the device (one setting), takes the loss of the
*real* outputs, and pulls ``dL/dy`` back to ``theta`` through a differentiable stand-in
``f_hat(theta, x)`` (a surrogate, or an approximate model for ``insitu-sat``) as a
vector-Jacobian product: ``g = J_f_hat(theta)^T dL/dy``. For a hybrid PNN the digital
readout gets its exact gradient from the real outputs and the digital input layer gets its
gradient through ``df_hat/dx``.

SAT's ascent pass at ``theta + eps`` goes to the device (``ascent="device"``: a second
setting, the paper's in-situ SAT) or to the stand-in (``ascent="surrogate"``: no extra
setting; the perturbed outputs are the measured ones plus the stand-in's predicted change,
``y + f_hat(theta + eps) - f_hat(theta)``, so the stand-in's bias cancels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blackbox_sat.optim.sat import sat_perturbation

from .context import TrainContext
from .objectives import device_loss
from .pnn import readout_loss

ASCENTS = ("device", "surrogate")


@dataclass
class StepResult:
    loss: float  # device loss at theta on this minibatch
    grad: np.ndarray  # (n_params,) gradient at theta (rho = 0) or at theta + eps
    eps: np.ndarray  # (n_params,) the SAT perturbation used (zeros when rho = 0)
    settings: int  # device settings this step paid
    x: np.ndarray | None = None  # (B, in_dim) device inputs measured at theta
    y: np.ndarray | None = None  # (B, out_dim) their measured outputs: data for a surrogate
    y_hat: np.ndarray | None = None  # (B, out_dim) the stand-in's prediction of them at theta


def _as_model(stand_in):
    """A callable ``(theta (P,), x (B, D)) -> (B, out)`` from a surrogate or a torch model."""
    return stand_in.predict if hasattr(stand_in, "predict") else stand_in


def _vjp(
    model, theta: np.ndarray, x: torch.Tensor, g_y: torch.Tensor
) -> tuple[np.ndarray, torch.Tensor | None, np.ndarray]:
    """``J^T g_y`` with respect to ``theta``, with respect to ``x`` when ``x`` needs it, and
    the stand-in's prediction ``(B, out_dim)`` at ``theta`` that the product came with."""
    th = torch.tensor(theta, dtype=torch.float32, requires_grad=True)
    xin = x.detach().to(torch.float32).requires_grad_(x.requires_grad)
    y_hat = model(th, xin)
    s = (y_hat.to(g_y.dtype) * g_y).sum()
    wrt = [th, xin] if x.requires_grad else [th]
    grads = torch.autograd.grad(s, wrt)
    return (
        grads[0].detach().double().numpy(),
        (grads[1].to(x.dtype) if x.requires_grad else None),
        y_hat.detach().double().numpy(),
    )


def surrogate_vjp(stand_in, theta: np.ndarray, x: torch.Tensor, g_y: torch.Tensor) -> np.ndarray:
    """``J_f_hat(theta)^T g_y`` ``(n_params,)``: the stand-in's pull-back of an output gradient
    ``g_y (B, out_dim)`` at inputs ``x (B, in_dim)``."""
    return _vjp(_as_model(stand_in), theta, x.detach(), g_y)[0]


def physics_aware_step(
    ctx: TrainContext,
    theta: np.ndarray,
    idx: np.ndarray,
    stand_in,
    rho: float = 0.0,
    ascent: str = "surrogate",
    adaptive: bool = False,
    purpose: str = "train",
) -> StepResult:
    """One physics-aware (SAT) gradient at ``theta`` on training rows ``idx``.

    Leaves the hybrid PNN's digital gradients in ``.grad`` (the caller's optimizer steps
    them). Raises ``BudgetExhausted`` if the device settings run out mid-step.
    """
    if ascent not in ASCENTS:
        raise ValueError(f"ascent must be one of {ASCENTS}, got {ascent!r}")
    model = _as_model(stand_in)
    x = ctx.pnn.device_inputs(ctx.f_train[idx])
    loss, g_y, x, y = device_loss(ctx, theta, idx, purpose, x)
    settings = 1
    grad, g_x, y_hat = _vjp(model, theta, x, g_y)
    eps = np.zeros_like(theta)
    if rho > 0 and np.any(grad):
        scale = torch.as_tensor(ctx.info.scale)
        eps = sat_perturbation(
            torch.as_tensor(grad), rho, scale, adaptive=adaptive, theta=torch.as_tensor(theta)
        ).numpy()
        theta_eps = ctx.info.project(theta + eps)
        if ascent == "device":
            _, g_y, _, _ = device_loss(ctx, theta_eps, idx, purpose, x, digital=False)
            settings += 1
        else:
            with torch.no_grad():  # the change from y_hat, the prediction at theta the VJP made
                y_eps = model(
                    torch.as_tensor(theta_eps, dtype=torch.float32), x.detach().to(torch.float32)
                )
            yt = (torch.as_tensor(y) + y_eps.double() - torch.as_tensor(y_hat)).requires_grad_(True)
            loss_eps = readout_loss(ctx.pnn, yt, ctx.y_train[idx])
            (g_y,) = torch.autograd.grad(loss_eps, yt)
        grad, g_x, _ = _vjp(model, theta_eps, x, g_y)
    if g_x is not None:  # the digital input layer's gradient through df_hat/dx
        x.backward(g_x, inputs=list(ctx.pnn.input_layer.parameters()))
    return StepResult(loss, grad, eps, settings, x.detach().numpy(), np.asarray(y), y_hat)


def normalized_step(
    opt: torch.optim.Optimizer,
    u: torch.Tensor,
    grad: np.ndarray,
    info,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Step ``opt`` on ``u = theta / scale`` with the physical gradient ``grad (n_params,)``,
    optionally clip ``u`` to a box ``(lo, hi)`` in ``u`` units, project onto the device
    domain, and return the new setting ``theta (n_params,)``."""
    u.grad = torch.as_tensor(grad * info.scale)
    opt.step()
    with torch.no_grad():
        if box is not None:
            u.copy_(torch.clamp(u, torch.as_tensor(box[0]), torch.as_tensor(box[1])))
        theta = info.project(u.detach().numpy() * info.scale)
        u.copy_(torch.as_tensor(theta / info.scale))
    return theta


class Anchors:
    """The latest device measurement of every training input, to anchor a stand-in to.

    Between device steps, extra steps can be taken on ``y_hat(theta, x_i) = f_hat(theta, x_i)
    + r_i`` with ``r_i = y_i - f_hat(theta_i, x_i)``: input ``i``'s latest measured output
    ``y_i`` (at setting ``theta_i``) plus the stand-in's predicted *change* since. The
    stand-in's bias cancels (as in the surrogate ascent above); only its error on the change
    remains, which the trust region keeps small. So a setting pays for several steps.
    """

    def __init__(self, n_train: int, out_dim: int):
        self.y = np.zeros((n_train, out_dim))
        self.setting = np.full(n_train, -1)  # index into self.thetas; -1: never measured
        self.thetas: list[np.ndarray] = []
        self.resid: torch.Tensor | None = None

    def record(self, step: StepResult, idx: np.ndarray, theta: np.ndarray) -> None:
        """Input rows ``idx`` were measured at ``theta`` in ``step`` (its outputs ``y`` and the
        current stand-in's prediction ``y_hat`` of them, computed by the step already)."""
        self.thetas.append(np.array(theta, dtype=float))
        self.setting[idx] = len(self.thetas) - 1
        self.y[idx] = step.y
        if self.resid is not None:
            assert step.y is not None and step.y_hat is not None, "a step records both"
            self.resid[idx] = torch.as_tensor(step.y - step.y_hat)

    def invalidate(self) -> None:
        """The stand-in changed (a refit): residuals are recomputed on next use."""
        self.resid = None

    def _residuals(self, ctx: TrainContext, model) -> torch.Tensor:
        resid = torch.zeros(self.y.shape, dtype=torch.float64)
        with torch.no_grad():
            for s in np.unique(self.setting[self.setting >= 0]):  # one stand-in call per setting
                rows = np.flatnonzero(self.setting == s)
                x = ctx.pnn.device_inputs(ctx.f_train[rows]).detach().to(torch.float32)
                pred = model(torch.as_tensor(self.thetas[s], dtype=torch.float32), x).double()
                resid[rows] = torch.as_tensor(self.y[rows]) - pred
        return resid

    def step_gradient(
        self,
        ctx: TrainContext,
        stand_in,
        theta: np.ndarray,
        idx: np.ndarray,
        rho: float = 0.0,
        adaptive: bool = False,
    ) -> np.ndarray | None:
        """The (SAT) gradient ``(n_params,)`` at ``theta`` of the anchored loss on rows ``idx``
        (those measured so far; None when there are none). Costs no setting."""
        idx = idx[self.setting[idx] >= 0]
        if len(idx) == 0:
            return None
        model = _as_model(stand_in)
        if self.resid is None:
            self.resid = self._residuals(ctx, model)
        with torch.no_grad():
            x = ctx.pnn.device_inputs(ctx.f_train[idx]).to(torch.float32)
        r, labels = self.resid[idx], torch.as_tensor(ctx.y_train[idx])

        def grad_at(th_np):
            th = torch.tensor(th_np, dtype=torch.float32, requires_grad=True)
            loss = readout_loss(ctx.pnn, model(th, x).double() + r, labels)
            return torch.autograd.grad(loss, th)[0].double()

        g = grad_at(theta)
        if rho > 0 and bool(g.any()):
            eps = sat_perturbation(
                g,
                rho,
                torch.as_tensor(ctx.info.scale),
                adaptive=adaptive,
                theta=torch.as_tensor(theta),
            ).numpy()
            g = grad_at(ctx.info.project(theta + eps))
        return g.numpy()


def anchored_steps(
    ctx: TrainContext,
    anchors: Anchors,
    stand_in,
    opt: torch.optim.Optimizer,
    u: torch.Tensor,
    theta: np.ndarray,
    batches,
    n: int,
    rho: float = 0.0,
    adaptive: bool = False,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``n`` optimizer steps of ``theta (n_params,)`` on anchored outputs (no setting), one
    minibatch from ``batches`` each; returns the new ``theta``. Digital layers of a hybrid PNN
    stay put: their gradients come from real outputs only."""
    for _ in range(n):
        g = anchors.step_gradient(ctx, stand_in, theta, next(batches), rho=rho, adaptive=adaptive)
        if g is None:
            continue
        for group in opt.param_groups[1:]:
            for q in group["params"]:
                q.grad = None
        theta = normalized_step(opt, u, g, info=ctx.info, box=box)
    return theta


def device_step(
    ctx: TrainContext,
    theta: np.ndarray,
    idx: np.ndarray,
    stand_in,
    opt: torch.optim.Optimizer,
    u: torch.Tensor,
    anchors: Anchors,
    batches,
    inner: int,
    rho: float = 0.0,
    ascent: str = "surrogate",
    adaptive: bool = False,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, StepResult]:
    """One physics-aware step measured on the device at ``theta (n_params,)`` (rows ``idx``),
    then ``inner`` anchored steps at no setting; returns the new theta and the device step
    (its ``x``, ``y`` are the measured rows). The caller zeroes ``opt``'s gradients first."""
    step = physics_aware_step(ctx, theta, idx, stand_in, rho=rho, ascent=ascent, adaptive=adaptive)
    anchors.record(step, idx, theta)
    theta = normalized_step(opt, u, step.grad, ctx.info, box)
    theta = anchored_steps(
        ctx, anchors, stand_in, opt, u, theta, batches, inner, rho=rho, adaptive=adaptive, box=box
    )
    return theta, step
