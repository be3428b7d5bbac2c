"""Sharpness-aware training (SAT): SAM applied to a device's control parameters.

One step of SAT, for parameters ``theta`` with gradient ``g``:

1. ``first_step``: move to ``theta + eps``, where ``eps`` is the steepest ascent step of L2
   length ``rho`` measured in **normalized coordinates** (each parameter divided by its
   ``scale``, the bound width; docs/design.md, "Units");
2. the caller recomputes the gradient at ``theta + eps``;
3. ``second_step``: go back to ``theta``, let the wrapped base optimizer step with that
   gradient, then project onto the device's bounds (clip, or wrap periodic parameters).

:func:`sat_perturbation` is the pure formula for ``eps``; the optimizer uses it, and so can
code that gets its gradients elsewhere (e.g. from a surrogate). :func:`projector` turns a
:class:`~blackbox_sat.devices.contract.DeviceInfo` into the in-place projection ``SAT``
takes.

Usage (closure API, as in davda54/sam)::

    opt = SAT([theta], torch.optim.Adam, rho=0.05, scale=info.scale, project=projector(info), lr=1e-2)
    loss_fn(theta).backward()                 # gradient at theta
    def closure():
        loss = loss_fn(theta); loss.backward(); return loss
    opt.step(closure)                         # perturb, closure at theta + eps, restore, step
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import numpy as np
import torch

#: ASAM's eta: the offset of the adaptive operator ``T = |u| + eta`` (Kwon et al. 2021).
ASAM_ETA = 0.01

TensorLike = torch.Tensor | np.ndarray | float
Projection = Callable[[torch.Tensor], Any]


def _per_tensor(value, n: int, name: str) -> list:
    """One entry of ``value`` per tensor: a list/tuple is taken per tensor, anything else is shared."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} tensors")
        return list(value)
    return [value] * n


def _scale_like(s, like: torch.Tensor, name: str = "scale") -> torch.Tensor | None:
    if s is None:
        return None
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    try:
        ok = torch.broadcast_shapes(s.shape, like.shape) == like.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(s.shape)} does not broadcast to a parameter of shape {tuple(like.shape)}"
        )
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError(f"{name} must be finite and > 0 everywhere")
    return s


@overload
def sat_perturbation(
    grad: torch.Tensor,
    rho: float,
    scale: TensorLike | Sequence[TensorLike] | None = None,
    adaptive: bool = False,
    theta: torch.Tensor | Sequence[torch.Tensor] | None = None,
    eta: float = ASAM_ETA,
) -> torch.Tensor: ...


@overload
def sat_perturbation(
    grad: Sequence[torch.Tensor],
    rho: float,
    scale: TensorLike | Sequence[TensorLike] | None = None,
    adaptive: bool = False,
    theta: torch.Tensor | Sequence[torch.Tensor] | None = None,
    eta: float = ASAM_ETA,
) -> list[torch.Tensor]: ...


def sat_perturbation(
    grad: torch.Tensor | Sequence[torch.Tensor],
    rho: float,
    scale: TensorLike | Sequence[TensorLike] | None = None,
    adaptive: bool = False,
    theta: torch.Tensor | Sequence[torch.Tensor] | None = None,
    eta: float = ASAM_ETA,
) -> torch.Tensor | list[torch.Tensor]:
    """The SAT ascent step ``eps`` (pure function, no side effects).

    ``grad`` is one tensor or a sequence of tensors (one per parameter, any shapes); the
    result has the same structure and shapes. ``scale`` (bound width ``s``, > 0; default 1)
    and ``theta`` are a single value broadcast to every tensor, or a sequence with one entry
    per tensor. Working in normalized coordinates ``u = theta / s`` (so ``g_u = g * s``), with
    the norm taken jointly over all tensors:

    * plain (SAM):      ``eps_u = rho * g_u / ||g_u||``
    * adaptive (ASAM):  ``T = |theta| / s + eta`` (elementwise), ``eps_u = rho * T^2 g_u / ||T g_u||``,
      i.e. the ascent step of the ball ``||T^-1 eps_u|| <= rho`` (Kwon et al. 2021, eq. 10);
      needs ``theta``.

    and ``eps = s * eps_u``. So with ``adaptive=False``, ``rho`` is exactly the L2 norm of the
    perturbation in normalized coordinates. A zero gradient gives ``eps = 0`` (no NaN).
    """
    single = isinstance(grad, torch.Tensor)
    grads = [grad] if isinstance(grad, torch.Tensor) else list(grad)
    if not grads:
        return []
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    n = len(grads)
    scales = _per_tensor(scale, n, "scale")
    thetas = _per_tensor(theta, n, "theta")
    if adaptive and any(t is None for t in thetas):
        raise ValueError("adaptive (ASAM) perturbation needs theta")

    gus, ts, ss = [], [], []
    for g, s, th in zip(grads, scales, thetas):
        g = g.detach()
        s = _scale_like(s, g)
        gu = g if s is None else g * s
        t = None
        if adaptive:
            u = th.detach() if s is None else th.detach() / s
            t = u.abs() + eta
        gus.append(gu)
        ts.append(t)
        ss.append(s)

    dev = grads[0].device
    weighted = [gu if t is None else t * gu for gu, t in zip(gus, ts)]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(w).to(dev) for w in weighted])
    )
    coef = rho / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # zero gradient -> eps = 0

    eps = []
    for gu, t, s, w in zip(gus, ts, ss, weighted):
        eps_u = coef.to(gu.device) * (gu if t is None else t * w)
        eps.append(eps_u if s is None else s * eps_u)
    return eps[0] if single else eps


class Projector:
    """In-place projection of a parameter tensor onto ``[low, high]``: non-periodic
    parameters are clipped, periodic ones wrapped into ``[low, high)``.

    Same rule as :meth:`DeviceInfo.project`. Works on any tensor whose last dimension is
    ``n_params`` (``(n_params,)`` or a batch ``(..., n_params)``). For float32 and lower
    precisions the bounds are rounded inwards, so a projected value converted back to float64
    never lies outside the float64 bounds (which ``check_theta`` would reject).
    """

    def __init__(self, low, high, periodic) -> None:
        self.low = np.asarray(low, dtype=np.float64).copy()
        self.high = np.asarray(high, dtype=np.float64).copy()
        self.periodic = np.broadcast_to(np.asarray(periodic, dtype=bool), self.low.shape).copy()
        if self.low.shape != self.high.shape:
            raise ValueError(f"low {self.low.shape} and high {self.high.shape} differ in shape")
        if np.any(self.periodic & ~(np.isfinite(self.low) & np.isfinite(self.high))):
            raise ValueError("periodic parameters need finite bounds (one period)")
        self._cache: dict = {}

    def _bounds(self, dtype: torch.dtype, device: torch.device):
        key = (dtype, device)
        if key not in self._cache:
            low = torch.as_tensor(self.low, dtype=dtype, device=device)
            high = torch.as_tensor(self.high, dtype=dtype, device=device)
            if dtype != torch.float64:  # round inwards so float64(value) stays in bounds
                lo64 = torch.as_tensor(self.low, device=device)
                hi64 = torch.as_tensor(self.high, device=device)
                try:
                    low = torch.where(
                        low.double() < lo64, torch.nextafter(low, torch.full_like(low, np.inf)), low
                    )
                    high = torch.where(
                        high.double() > hi64,
                        torch.nextafter(high, torch.full_like(high, -np.inf)),
                        high,
                    )
                except RuntimeError:  # nextafter not implemented for this dtype
                    pass
            width = high - low
            wrap = torch.as_tensor(self.periodic, device=device) & torch.isfinite(width)
            period = torch.where(wrap, width, torch.ones_like(width))
            self._cache[key] = (low, high, wrap, period)
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Project ``t`` (shape ``(..., n_params)``) in place and return it."""
        low, high, wrap, period = self._bounds(t.dtype, t.device)
        clipped = torch.clamp(t, low, high)
        if bool(wrap.any()):
            wrapped = low + torch.remainder(t - low, period)
            wrapped = torch.where(
                wrapped >= high, low, wrapped
            )  # rounding may hit high: keep [low, high)
            clipped = torch.where(wrap, wrapped, clipped)
        t.copy_(clipped)
        return t


def projector(info) -> Projector:
    """Projection callable for a device: ``info`` is a :class:`DeviceInfo` or anything with
    ``low``, ``high`` (``(n_params,)``) and ``periodic`` (bool or ``(n_params,)``). A device
    object without those members is read with :func:`blackbox_sat.devices.contract.describe`.
    The callable projects a tensor ``(..., n_params)`` in place and returns it."""
    if not all(hasattr(info, a) for a in ("low", "high", "periodic")):
        from blackbox_sat.devices.contract import describe

        info = describe(info)
    return Projector(info.low, info.high, info.periodic)


class SAT(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer, in normalized coordinates.

    ``SAT(params, torch.optim.Adam, rho=0.05, scale=info.scale, project=projector(info), lr=1e-2)``

    * ``rho``: L2 radius of the perturbation in normalized coordinates (docs/design.md "Units").
    * ``adaptive``: ASAM instead of SAM; see :func:`sat_perturbation` for the formula; ``eta``
      is ASAM's offset.
    * ``scale``: bound width ``s`` (> 0). ``None`` (= 1), a number, an array/tensor
      broadcastable to every parameter of the group, or a list with one entry per parameter.
    * ``project``: ``None``, a callable, or a list of callables (one per parameter). It is
      called under ``no_grad`` on each parameter (detached, sharing storage) after every base
      step; it may modify it in place, or return the projected value (tensor or array), which
      is copied back. :func:`projector` builds one; ``DeviceInfo.project`` works as-is too.
    * ``project_perturbed``: also project ``theta + eps`` in ``first_step`` (default ``True``),
      so the point measured at the ascent step is a valid setting for a device. ``eps`` as
      reported by :meth:`perturbation` is always the unprojected formula value.
    * ``**base_kwargs`` go to ``base_optimizer_cls``. Param-group options (``rho``, ``scale``
      ...) may be set per group; the groups are shared with the base optimizer.
    """

    def __init__(
        self,
        params,
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        scale: TensorLike | Sequence[TensorLike] | None = None,
        project: Projection | Sequence[Projection] | None = None,
        eta: float = ASAM_ETA,
        project_perturbed: bool = True,
        **base_kwargs,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        defaults = dict(
            rho=rho,
            adaptive=adaptive,
            scale=scale,
            project=project,
            eta=eta,
            project_perturbed=project_perturbed,
            **base_kwargs,
        )
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _apply_project(proj: Projection | None, p: torch.Tensor) -> None:
        if proj is None:
            return
        out = proj(p.detach())
        if out is not None:
            p.copy_(torch.as_tensor(out, dtype=p.dtype, device=p.device))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save ``theta`` and move every parameter with a gradient to ``theta + eps``."""
        for group in self.param_groups:
            plist = group["params"]
            scales = _per_tensor(group["scale"], len(plist), "scale")
            projs = _per_tensor(group["project"], len(plist), "project")
            live = [i for i, p in enumerate(plist) if p.grad is not None]
            eps = sat_perturbation(
                [plist[i].grad for i in live],
                group["rho"],
                [scales[i] for i in live],
                group["adaptive"],
                [plist[i] for i in live],
                group["eta"],
            )
            for p in plist:
                self.state[p]["eps"] = torch.zeros_like(p)
                self.state[p].pop("old_p", None)
            for i, e in zip(live, eps):
                p = plist[i]
                state = self.state[p]
                state["old_p"] = p.detach().clone()
                state["eps"] = e
                p.add_(e)
                if group["project_perturbed"]:
                    self._apply_project(projs[i], p)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``theta``, step the base optimizer with the gradient now in ``.grad`` (taken
        at ``theta + eps``), then project every parameter."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self.base_optimizer.step()
        for group in self.param_groups:
            projs = _per_tensor(group["project"], len(group["params"]), "project")
            for p, proj in zip(group["params"], projs):
                self._apply_project(proj, p)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAT step (davda54/sam's closure API). The gradient at ``theta`` must already be
        in ``.grad`` (the caller ran forward+backward once). ``closure`` does forward+backward
        without zeroing; it is called once, at ``theta + eps``, after SAT zeroed the gradients.
        Returns what ``closure`` returned (the loss at ``theta + eps``)."""
        if closure is None:
            raise ValueError(
                "SAT.step needs a closure that does forward+backward; "
                "or call first_step() and second_step() yourself"
            )
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            raise RuntimeError(
                "SAT.step found no gradients: run forward+backward at theta before step(closure)"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def perturbation(self) -> list[torch.Tensor]:
        """The ``eps`` of the last ``first_step``, one tensor per parameter (shapes of the
        parameters, all groups in order; zeros for parameters that had no gradient)."""
        return [
            self.state[p].get("eps", torch.zeros_like(p))
            for g in self.param_groups
            for p in g["params"]
        ]

    def state_dict(self) -> dict:
        """The base optimizer's state dict (its moments, and the shared groups with SAT's
        options). SAT's own state only lives between ``first_step`` and ``second_step``."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned (e.g. to resume a run)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
