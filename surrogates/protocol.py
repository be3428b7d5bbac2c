"""The contract every surrogate meets.

A surrogate ``f_hat(theta, x) ~ y`` is fit from measured rows: one row per measured sample,
the ``theta`` of its setting repeated on every row of that setting. It sees arrays only.

Shapes used throughout the package:

- ``theta``: ``(n, n_params)`` control settings, one row per sample;
- ``x``: ``(n, in_dim)`` inputs;
- ``y``: ``(n, out_dim)`` measured outputs;
- ``groups``: ``(n,)`` integer setting ids (rows of one setting share an id). When omitted,
  rows with identical ``theta`` form one group.
"""

from __future__ import annotations

from os import PathLike
from typing import Protocol, runtime_checkable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@runtime_checkable
class Surrogate(Protocol):
    """What the training loop relies on. Implemented by :class:`~surrogates.neural.EnsembleSurrogate`,
    :class:`~surrogates.interferometric.InterferometricSurrogate` and
    :class:`~surrogates.gp.GPSurrogate`."""

    n_params: int | None
    in_dim: int | None
    out_dim: int | None

    def fit(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> Surrogate:
        """Fit from scratch on ``(n, n_params)``, ``(n, in_dim)``, ``(n, out_dim)`` rows.
        Whole settings (``groups``) are held out for early stopping."""
        ...

    def update(
        self,
        theta: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        groups: np.ndarray | None = None,
        *,
        steps: int | None = None,
        append: bool = False,
        centre: np.ndarray | None = None,
    ) -> Surrogate:
        """Refit warm-started for ``steps`` steps on these rows (``append=False``) or on the
        stored rows plus these (``append=True``). ``centre`` re-centres models that have one."""
        ...

    def predict(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """Mean prediction ``(m, out_dim)``, differentiable in ``theta`` and ``x``.
        ``theta`` is ``(n_params,)`` (one setting for every row of ``x``) or ``(m, n_params)``."""
        ...

    def predict_with_uncertainty(
        self, theta: ArrayLike, x: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and epistemic standard deviation, each ``(m, out_dim)``."""
        ...

    def save(self, path: str | PathLike) -> None:
        """Write configuration and fitted state with ``torch.save``."""
        ...

    @classmethod
    def load(cls, path: str | PathLike) -> Surrogate:
        """Rebuild a saved surrogate; predictions are identical to the saved one's."""
        ...
