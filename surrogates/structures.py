"""Network families for :class:`~surrogates.neural.EnsembleSurrogate`.

A structure maps normalised ``theta (M|1, S, 1|K, n_params)`` and ``x (M|1, S, K, in_dim)``
to ``y (M, S, K, out_dim)`` for ``M`` stacked ensemble members (any number of batch
dimensions, broadcast between ``theta`` and ``x``). A size-1 ``theta`` dimension means one
setting shared by ``K`` rows, and the ``theta`` path is then computed once for them: training
draws several inputs per setting for this reason, and prediction at one setting uses it. Periodic ``theta`` columns
are encoded as ``(sin, cos)`` (:class:`~surrogates.encoding.PeriodicEncoding`).

Families:

- :class:`HyperStructure` (``"hyper"``): ``theta`` generates the weights acting on ``x``,
  after a learned 1-D warp of each non-periodic control.
  Prototype measurements found this multiplicative form learns far better loss gradients
  than a plain MLP (cosine 0.86-0.92 against 0.16-0.65).
- ``"hyper-additive"``: the same without the warp or the lasso, with ``param_features=4``: every
  non-periodic control gets its own learned 1-D response path into the weights (below).
  Chosen by name; the pipeline's ``auto`` tries it when it is in ``surrogate_candidates``.
- :class:`MLPStructure` (``"mlp"``): a plain MLP on ``[theta, x]``, kept as the baseline.

On a 160-parameter microring-like device (trust region 0.05, 64 inputs per setting), the
held-out R^2 of the ``theta``-dependent output was, for 250 / 500 / 1000 settings, 0.89 /
0.96 / 0.975 (hyper) against 0.78 / 0.91 / 0.93 (mlp); gradient cosines 0.97 / 0.996 /
0.998 against 0.95 / 0.994 / 0.996.

The interferometric family lives in :mod:`surrogates.interferometric`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .encoding import PeriodicEncoding
from .ensemble import ColumnUnits, EnsembleLinear, EnsembleMLP


@runtime_checkable
class ThetaShiftable(Protocol):
    """A structure that re-expresses itself for plain ``theta`` columns ``z' = z - shift``,
    which is what lets :meth:`~surrogates.neural.EnsembleSurrogate.recentre` keep its
    predictions."""

    def shift_theta(self, shift: torch.Tensor) -> None: ...


class HyperStructure(nn.Module):
    """``h = W(theta) [x, 1]`` then ``y = Q h + MLP([h, x])``.

    ``W(theta) = P diag(c(theta)) V`` is a rank-``rank`` factorisation with a
    ``theta``-dependent core: ``V`` is ``(rank, in_dim + 1)``, ``P`` is ``(width, rank)`` and
    the coefficients ``c(theta) = b + L phi(theta) + MLP(phi(theta))`` have a linear path
    (exact for weights affine in ``theta``: the local picture in a trust region) and a
    nonlinear one.

    ``quadratic=True`` adds the squares of the non-periodic columns to the linear path, so
    that each weight can have its own curvature in its own parameter (a ring's Lorentzian in
    its heater), which the MLP path could only give with a hidden unit per parameter. It is
    off by default: over a uniform trust-region box in many dimensions the sum of squares
    is nearly constant (concentration of measure), so predictions at the box centre, where
    training evaluates the surrogate, are an extrapolation and went wrong (theta-part R^2
    0.69 against 0.965 without squares, 1000 settings of a 160-parameter microring-like
    device). With ``design_settings(..., spread="shells")``, which puts points at every
    distance from the centre, it measured 0.990 against 0.974 without squares.

    ``param_features=K`` adds to the coefficients an *additive* per-control path,
    ``sum_j sum_k L_jk silu(a_jk z_j + b_jk)``: each control ``j`` gets ``K`` SiLU units of its
    own column only. Physical controls are mostly separate actuators (a heater, a pixel, a
    bias voltage), each acting through its own smooth, often sharply curved transfer curve
    (a ring's Lorentzian, a modulator's cosine, a pixel's gamma), with weak coupling between
    them; a shared MLP on all columns could only learn such a curve with units to spare per
    control. The path starts at zero (``L = 0``), so the model starts as the plain form.
    Measured (1000 settings, radius 0.05, 64 inputs/setting, 5 members; R^2 of the
    ``theta``-driven change / loss-gradient cosine at the centre): mrr at ``theta0`` 0.972 /
    0.995 against 0.871 / 0.991 without; mrr halfway through an oracle run 0.920 / 0.698
    against 0.487 / 0.125; freespace, whose response is nearly linear in each pixel, 0.907 /
    0.989 at ``theta0`` and 0.900 / 0.959 halfway against 0.945 / 0.993 and 0.945 / 0.974
    (the extra path only adds variance there).
    Periodic columns need no such path: a phase acts through ``(sin, cos)`` exactly.

    ``param_warp=K`` (default 4) first passes each plain column through its own learned
    warp, ``z_j + sum_k alpha_jk silu(a_jk z_j + b_jk)``, starting as the identity
    (``alpha = 0``); everything downstream sees the warped columns. It is the additive idea
    at a fraction of the cost: where a control acts through one sharply curved transfer
    curve, the warp can become that curve and the linear path then places it exactly, and
    it adds only ``3 K`` weights per control, so a device that is linear in its controls
    loses nothing to variance (``param_features`` adds ``K * rank`` per control). Measured
    as above (``param_warp`` 4 against 0): mrr at ``theta0`` 0.989 / 0.996 against 0.871 /
    0.991; mrr halfway 0.954 / 0.127 against 0.487 / 0.125 (a nearly converged point: the
    true gradient is 1/15 of its size at ``theta0`` and turns by 87 degrees across the
    data); freespace 0.942 / 0.992 and 0.942 / 0.953 against 0.945 / 0.993 and
    0.945 / 0.974.

    ``l1`` (default 2.5e-5) adds a lasso on the linear path's weights ``L`` from the plain
    columns to the training loss, per member times its held-out RMS error in normalised
    units (an estimate of the noise it fits against: a lasso's weight grows with the noise
    level, so a clean device is barely pulled and a noisy one more). Separate actuators
    (heaters, pixels, biases) mostly touch few weights each, so that part of ``L`` is sparse
    in truth, and a dense one fitted to noisy outputs spends its freedom on the noise. A
    phase in an interferometer reaches every output, so periodic columns are left out: with
    them in, ``auto`` picked ``hyper`` over the interferometric family on mzi (held-out
    Delta-R^2 0.50-0.52 against 0.43-0.45) and ``blackbox-sat`` fell to 31.1 +- 2.3 from
    46.9 +- 2.5. Measured (1000 settings, as above): freespace, whose read noise is about as
    large as the ``theta``-driven change, 0.973 / 0.996 at ``theta0`` against 0.942 / 0.992
    without; mrr at the oracle's midway point 0.974 / 0.890 and 0.980 / 0.883 (two fitting
    seeds) against 0.984 / 0.934 and 0.984 / 0.874.

    The factorised form costs ``rank * (in_dim + 1 + width)`` per row instead of
    materialising a ``width x (in_dim+1)`` matrix per setting; the ``theta`` path is computed
    once per setting.

    ``rank`` must reach the number of independently controlled weights for a device such as a
    microring bank, where each of ``out*in`` weights has its own heater: the default 256 covers
    a 10 x 16 bank. ``Q h`` makes outputs exactly linear in ``x`` representable; the small
    MLP on ``[h, x]`` adds the saturations (detector nonlinearities, warp blending).
    """

    def __init__(
        self,
        n_members: int,
        n_params: int,
        in_dim: int,
        out_dim: int,
        periodic: np.ndarray,
        rank: int = 256,
        coef_hidden: int = 128,
        width: int = 64,
        head_hidden: int = 64,
        quadratic: bool = False,
        param_features: int = 0,
        param_warp: int = 4,
        l1: float = 2.5e-5,
    ):
        if param_features < 0 or param_warp < 0:
            raise ValueError(
                f"param_features and param_warp must be >= 0, got {param_features}, {param_warp}"
            )
        super().__init__()
        self.encode = PeriodicEncoding(periodic)
        p = self.encode.out_dim
        self.n_squares = int((~np.asarray(periodic, bool)).sum()) if quadratic else 0
        self.coef_linear = EnsembleLinear(n_members, p + self.n_squares, rank)
        # The core starts near 1 so that W(theta) starts as a random full map P V, and the
        # nonlinear path starts small so that early fitting finds the linear picture first.
        assert self.coef_linear.bias is not None
        with torch.no_grad():
            self.coef_linear.bias.fill_(1.0)
        self.coef_mlp = EnsembleMLP(n_members, p, [coef_hidden], rank, final_init_scale=0.1)
        self.n_plain = n_plain = int((~np.asarray(periodic, bool)).sum())
        self.warp = self.feat = None
        if n_plain and param_warp:
            # Each plain column's own warp z + sum_k alpha_k silu(a_k z + b_k), starting as z.
            self.warp = ColumnUnits(n_members, n_plain, param_warp)
            self.warp_alpha = nn.Parameter(torch.zeros(n_members, n_plain, param_warp))
        if n_plain and param_features:
            # Each plain column's own response: K SiLU units of that column alone.
            self.feat = ColumnUnits(n_members, n_plain, param_features)
            self.coef_sep = EnsembleLinear(
                n_members, n_plain * param_features, rank, bias=False, init_scale=0.0
            )
        self.x_proj = EnsembleLinear(n_members, in_dim, rank)  # V [x, 1]
        self.mix = EnsembleLinear(n_members, rank, width, bias=False)  # P
        self.readout = EnsembleLinear(n_members, width, out_dim)  # Q
        self.head = EnsembleMLP(
            n_members, width + in_dim, [head_hidden], out_dim, final_init_scale=0.1
        )
        self.n_members = n_members
        self.l1 = float(l1)

    def penalty(self, scale: torch.Tensor | None = None) -> torch.Tensor | float:
        """L1 norm of the linear path's weights from the plain ``theta`` columns, times
        ``l1``, per member times ``scale (M,)`` when given."""
        if not self.l1 or not self.n_plain:
            return 0.0
        # PeriodicEncoding puts the plain columns first.
        per_member = self.coef_linear.weight[:, : self.n_plain].abs().sum(dim=(1, 2))
        return self.l1 * (per_member if scale is None else per_member * scale).sum()

    @torch.no_grad()
    def shift_theta(self, shift: torch.Tensor) -> None:
        """Re-express the model for plain ``theta`` columns ``z' = z - shift`` (``shift`` of
        shape ``(n_plain,)``); predictions are unchanged up to rounding."""
        first = self.coef_mlp.layers[0]
        assert isinstance(first, EnsembleLinear)
        first.absorb_input_shift(shift)
        for units in (self.warp, self.feat):
            if units is not None:
                units.absorb_input_shift(shift)
        lin = self.coef_linear
        if self.n_squares:
            # z^2 = z'^2 + 2 shift z' + shift^2: the squares feed the linear rows and the bias.
            p = self.encode.out_dim
            squares = lin.weight[:, p : p + self.n_squares, :]
            assert lin.bias is not None
            lin.bias.add_(torch.einsum("i,mio->mo", shift**2, squares).unsqueeze(1))
            lin.absorb_input_shift(shift)
            lin.weight[:, : self.n_squares, :] += 2 * shift[None, :, None] * squares
        else:
            lin.absorb_input_shift(shift)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        phi = self.encode(theta)
        # PeriodicEncoding puts the plain columns first.
        if self.warp is not None:
            z = phi[..., : self.n_plain]
            warped = z + (self.warp.per_member(self.warp_alpha, z.dim() - 2) * self.warp(z)).sum(-1)
            rest = phi[..., self.n_plain :]
            phi = torch.cat([warped, rest.expand(*warped.shape[:-1], rest.shape[-1])], dim=-1)
        linear_in = (
            torch.cat([phi, phi[..., : self.n_squares] ** 2], dim=-1) if self.n_squares else phi
        )
        coef = self.coef_linear(linear_in) + self.coef_mlp(phi)  # (M, S, 1|K, rank)
        if self.feat is not None:
            coef = coef + self.coef_sep(self.feat(phi[..., : self.n_plain]).flatten(-2))
        h = self.mix(coef * self.x_proj(x))  # (M, S, K, width)
        x_m = x.expand(self.n_members, *h.shape[1:-1], x.shape[-1])
        return self.readout(h) + self.head(torch.cat([h, x_m], dim=-1))


class MLPStructure(nn.Module):
    """Plain MLP on ``[phi(theta), x]`` (SiLU), the baseline.

    The first layer is split into a ``theta`` part and an ``x`` part (the same affine map as on
    the concatenation) so that a shared setting is multiplied once, not once per row.
    """

    def __init__(
        self,
        n_members: int,
        n_params: int,
        in_dim: int,
        out_dim: int,
        periodic: np.ndarray,
        hidden: int = 256,
        depth: int = 3,
    ):
        super().__init__()
        self.encode = PeriodicEncoding(periodic)
        self.first_theta = EnsembleLinear(n_members, self.encode.out_dim, hidden)
        self.first_x = EnsembleLinear(n_members, in_dim, hidden, bias=False)
        self.rest = EnsembleMLP(n_members, hidden, [hidden] * (depth - 1), out_dim)

    @torch.no_grad()
    def shift_theta(self, shift: torch.Tensor) -> None:
        """Re-express the model for plain ``theta`` columns ``z' = z - shift``."""
        self.first_theta.absorb_input_shift(shift)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.first_theta(self.encode(theta)) + self.first_x(x)
        return self.rest(nn.functional.silu(h))


STRUCTURES: dict[str, Callable[..., nn.Module]] = {
    "hyper": HyperStructure,
    "hyper-additive": partial(HyperStructure, param_features=4, param_warp=0, l1=0.0),
    "mlp": MLPStructure,
}
