"""Shared machinery of the surrogates: argument checking, query shapes, persistence.

Persistence is one ``torch.save`` of plain data (constructor keywords, fitted dimensions and
tensors), loadable with ``torch.load(weights_only=True)``: no pickled classes, so a saved
surrogate can be read safely and by later versions that keep the keywords.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from os import PathLike
from typing import Any, ClassVar

import numpy as np
import torch

from .dataset import dense_groups, groups_from_theta
from .protocol import ArrayLike

_FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SurrogateBase(ABC):
    """Base of every surrogate in this package (see :class:`~surrogates.protocol.Surrogate`).

    Args:
        theta_low, theta_high: ``(n_params,)`` bounds (or scalars). When given, ``theta`` is
            normalised by them (:mod:`surrogates.normalize`); otherwise by data statistics.
        periodic: ``bool`` or ``(n_params,)`` mask of periodic parameters (phases).
        seed: seeds initialisation, hold-out splits and minibatches.
        dtype: ``"float32"`` or ``"float64"``; predictions are returned in it.
    """

    _classes: ClassVar[dict[str, type[SurrogateBase]]] = {}
    #: How non-periodic ``theta`` columns are normalised (:meth:`AffineNormalizer.for_theta`).
    theta_frame: ClassVar[str] = "data"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SurrogateBase._classes[cls.__name__] = cls

    def __init__(
        self,
        *,
        theta_low: ArrayLike | float | None = None,
        theta_high: ArrayLike | float | None = None,
        periodic: bool | ArrayLike | None = None,
        seed: int = 0,
        dtype: str = "float32",
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.theta_low = None if theta_low is None else np.asarray(theta_low, np.float64)
        self.theta_high = None if theta_high is None else np.asarray(theta_high, np.float64)
        self.periodic = periodic
        self.seed = int(seed)
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.n_params: int | None = None
        self.in_dim: int | None = None
        self.out_dim: int | None = None

    # -- arguments ----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.n_params is not None

    def periodic_mask(self, n_params: int | None = None) -> np.ndarray:
        """``(n_params,)`` bool mask from the ``periodic`` argument."""
        n_params = self.n_params if n_params is None else n_params
        assert n_params is not None, "n_params is known once fitted, or must be given"
        if self.periodic is None:
            return np.zeros(n_params, bool)
        return np.broadcast_to(np.asarray(self.periodic, bool), (n_params,)).copy()

    def _check_rows(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validated float64 rows and dense setting ids."""
        theta, x, y = (np.asarray(a, np.float64) for a in (theta, x, y))
        for name, a in (("theta", theta), ("x", x), ("y", y)):
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-d (n, dim), got shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} has non-finite values")
        if not (len(theta) == len(x) == len(y)) or len(theta) == 0:
            raise ValueError(
                f"theta, x, y need the same number n > 0 of rows, got "
                f"{len(theta)}, {len(x)}, {len(y)}"
            )
        if self.is_fitted:
            dims = (theta.shape[1], x.shape[1], y.shape[1])
            if dims != (self.n_params, self.in_dim, self.out_dim):
                raise ValueError(
                    f"(n_params, in_dim, out_dim) = {dims}, but the surrogate was "
                    f"fit with {(self.n_params, self.in_dim, self.out_dim)}"
                )
        if groups is None:
            groups = groups_from_theta(theta)
        else:
            groups = np.asarray(groups)
            if groups.shape != (len(theta),):
                raise ValueError(f"groups must have shape ({len(theta)},), got {groups.shape}")
            groups = dense_groups(groups)
        return theta, x, y, groups

    def _as_query(self, theta: ArrayLike, x: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """``theta (1|m, n_params)`` and ``x (m, in_dim)`` tensors in the model dtype; graphs of
        tensor arguments are kept, so gradients flow back to them."""
        if not self.is_fitted:
            raise RuntimeError("the surrogate is not fitted: call fit() first")
        theta = torch.as_tensor(theta).to(self.dtype)
        x = torch.as_tensor(x).to(self.dtype)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (m, {self.in_dim}), got {tuple(x.shape)}")
        if (
            theta.ndim != 2
            or theta.shape[1] != self.n_params
            or theta.shape[0] not in (1, x.shape[0])
        ):
            raise ValueError(
                f"theta must have shape ({self.n_params},) or ({x.shape[0]}, "
                f"{self.n_params}), got {tuple(theta.shape)}"
            )
        return theta, x

    # -- the protocol ---------------------------------------------------------------------
    @abstractmethod
    def fit(self, theta, x, y, groups=None): ...

    @abstractmethod
    def update(self, theta, x, y, groups=None, *, steps=None, append=False, centre=None): ...

    @abstractmethod
    def predict_with_uncertainty(
        self, theta: ArrayLike, x: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def predict(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """Mean prediction ``(m, out_dim)``, differentiable in ``theta`` and ``x``."""
        return self.predict_with_uncertainty(theta, x)[0]

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor keywords, as plain Python values."""
        tolist = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {
            "theta_low": tolist(self.theta_low),
            "theta_high": tolist(self.theta_high),
            "periodic": tolist(self.periodic),
            "seed": self.seed,
            "dtype": self.dtype_name,
        }

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Fitted tensors."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Rebuild fitted modules from :meth:`_state`'s output; dimensions are already set."""

    def save(self, path: str | PathLike) -> None:
        """Write configuration and fitted state (``torch.save``)."""
        if not self.is_fitted:
            raise RuntimeError("nothing to save: the surrogate is not fitted")
        torch.save(
            {
                "format": _FORMAT_VERSION,
                "class": type(self).__name__,
                "config": self.config(),
                "dims": [self.n_params, self.in_dim, self.out_dim],
                "state": self._state(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | PathLike) -> SurrogateBase:
        """Rebuild a saved surrogate of whatever class saved it."""
        payload = torch.load(path, weights_only=True)
        if payload.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported surrogate file format {payload.get('format')!r}")
        klass = SurrogateBase._classes[payload["class"]]
        if not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass(**payload["config"])
        obj.n_params, obj.in_dim, obj.out_dim = payload["dims"]
        obj._load_state(payload["state"])
        return obj
