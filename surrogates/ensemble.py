"""Layers for deep ensembles with stacked weights.

Every parameter carries a leading member dimension ``M``, so one batched matrix product runs
all members at once (no Python loop over members, no ``vmap`` overhead). Activations have
shape ``(M, *batch, features)`` with any number of batch dimensions. A leading size of 1
means "the same rows for every member" (prediction), computed as one wide matrix product.

The training loop (:mod:`surrogates.training`) relies on the convention that *every*
parameter of an ensemble structure has the member dimension first: it snapshots and
restores members independently for early stopping.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


class EnsembleLinear(nn.Module):
    """``M`` independent affine maps: ``(M|1, *batch, in) -> (M, *batch, out)``.

    Initialised like :class:`torch.nn.Linear` (uniform in ``+-1/sqrt(in)``), independently
    per member, which is what makes the members of a deep ensemble differ.
    """

    def __init__(
        self,
        n_members: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_scale: float = 1.0,
    ):
        super().__init__()
        self.n_members, self.in_features, self.out_features = n_members, in_features, out_features
        bound = init_scale / math.sqrt(max(in_features, 1))
        self.weight = nn.Parameter(
            torch.empty(n_members, in_features, out_features).uniform_(-bound, bound)
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(n_members, 1, out_features).uniform_(-bound, bound))
            if bias
            else None
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch = inputs.shape[1:-1]
        flat = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if flat.shape[0] == 1 and self.n_members > 1:
            # Shared rows: one (B, in) x (in, M*out) product beats M small ones.
            out = torch.einsum("bi,mio->mbo", flat[0], self.weight)
            if self.bias is not None:
                out = out + self.bias
        elif self.bias is None:
            out = torch.bmm(flat, self.weight)
        else:
            out = torch.baddbmm(self.bias, flat, self.weight)
        return out.reshape(self.n_members, *batch, self.out_features)

    @torch.no_grad()
    def absorb_input_shift(self, shift: torch.Tensor, start: int = 0) -> None:
        """Re-express the map for inputs ``z' = z - shift`` on input rows
        ``start .. start + len(shift)``: ``W z + b = W z' + (b + shift W)``."""
        assert self.bias is not None, "an input shift is absorbed into the bias"
        rows = self.weight[:, start : start + shift.shape[-1], :]
        self.bias.add_(torch.einsum("i,mio->mo", shift.to(rows.dtype), rows).unsqueeze(1))

    def extra_repr(self) -> str:
        return f"members={self.n_members}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class EnsembleMLP(nn.Module):
    """``M`` independent MLPs ``in -> hidden... -> out`` with SiLU between layers.

    SiLU rather than ReLU: the surrogate's gradients are what training uses, and a smooth
    activation gives smooth, non-piecewise-constant gradients.
    """

    def __init__(
        self,
        n_members: int,
        in_features: int,
        hidden: list[int] | tuple[int, ...],
        out_features: int,
        final_init_scale: float = 1.0,
    ):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            last = i == len(sizes) - 2
            layers.append(
                EnsembleLinear(n_members, a, b, init_scale=final_init_scale if last else 1.0)
            )
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = nn.functional.silu(h)
        return h


class ColumnUnits(nn.Module):
    """``K`` SiLU units per column for ``M`` members, each unit seeing its own column only:
    ``z (M|1, *batch, C) -> (M, *batch, C, K)``, unit ``k`` of column ``c`` being
    ``silu(a[c, k] * z_c + b[c, k])``. The per-control transfer curves of
    :class:`~surrogates.structures.HyperStructure` are built from these."""

    def __init__(self, n_members: int, n_columns: int, k: int):
        super().__init__()
        self.a = nn.Parameter(torch.empty(n_members, n_columns, k).uniform_(-2.0, 2.0))
        self.b = nn.Parameter(torch.empty(n_members, n_columns, k).uniform_(-2.0, 2.0))

    def per_member(self, t: torch.Tensor, batch_dims: int) -> torch.Tensor:
        """``t (M, C, K)`` viewed to broadcast over ``batch_dims`` batch dimensions."""
        return t.view(t.shape[0], *([1] * batch_dims), *t.shape[1:])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.dim() - 2
        return nn.functional.silu(
            self.per_member(self.a, n) * z.unsqueeze(-1) + self.per_member(self.b, n)
        )

    @torch.no_grad()
    def absorb_input_shift(self, shift: torch.Tensor) -> None:
        """Re-express for inputs ``z' = z - shift`` (``shift (C,)``): same outputs."""
        self.b.add_(self.a * shift[:, None])
