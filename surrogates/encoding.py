"""Encoding of periodic control parameters (phases) for structures that need it.

A phase near ``-pi`` and one near ``+pi`` are the same setting, so a network fed the raw
normalised value sees a discontinuity that is not there. :class:`PeriodicEncoding` replaces each
periodic column ``z`` (normalised so that ``pi * z`` is the angle) by ``(sin(pi z), cos(pi z))``
and passes the other columns through. The MLP, hypernetwork and GP surrogates use it; the
interferometric structure uses the angle itself (``exp(i * angle)``), which is periodic already.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class PeriodicEncoding(nn.Module):
    """``(..., n_params) -> (..., n_params + n_periodic)``: plain columns, then sin, then cos."""

    periodic_idx: torch.Tensor
    plain_idx: torch.Tensor

    def __init__(self, periodic: np.ndarray | torch.Tensor):
        super().__init__()
        mask = torch.as_tensor(np.asarray(periodic, dtype=bool))
        self.register_buffer("periodic_idx", torch.nonzero(mask).flatten())
        self.register_buffer("plain_idx", torch.nonzero(~mask).flatten())
        self.n_params = int(mask.numel())

    @property
    def out_dim(self) -> int:
        return self.n_params + int(self.periodic_idx.numel())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.periodic_idx.numel() == 0:
            return z
        angle = math.pi * z.index_select(-1, self.periodic_idx)
        plain = z.index_select(-1, self.plain_idx)
        return torch.cat([plain, torch.sin(angle), torch.cos(angle)], dim=-1)
