"""The device contract: what any device object must offer.

A device is duck-typed. It needs ``n_params``, ``in_dim``, ``out_dim`` and
``query(theta, x) -> y``; ``bounds``, ``periodic``, ``input_bounds``, ``theta0`` and
``max_batch`` are optional. :func:`describe` reads those members once into a
:class:`DeviceInfo` with documented defaults, and the ``check_*`` functions validate every
query before and after the device is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Scale used for a parameter without finite bounds: its "bound width" is taken as 1.
DEFAULT_UNBOUNDED_SCALE = 1.0
#: Jitter of the default starting point, as a fraction of each bound width.
THETA0_JITTER = 0.01


class UserError(Exception):
    """Bad input from the user (a flag, a file, an adapter): the CLI prints it in one line and
    exits 2. Anything else is a bug and keeps its traceback."""


class InvalidInput(UserError, ValueError):
    """A value the user gave (a flag, a keyword, a file's content) that cannot be used."""


class InvalidType(UserError, TypeError):
    """An argument of the wrong kind (a number where a task name or arrays were expected)."""


class MissingCapability(UserError, TypeError):
    """The device or the run lacks what the chosen method needs (a model, bounds, a seed)."""


class DeviceContractError(UserError, ValueError):
    """A device, or a query to it, breaks the device contract."""


class DeviceOutputError(UserError, RuntimeError):
    """A device returned something unusable (wrong shape, NaN, inf) or raised."""


@dataclass(frozen=True)
class DeviceInfo:
    """The contract members of one device, with defaults filled in.

    Shapes: ``low``/``high``/``periodic``/``scale`` are ``(n_params,)``;
    ``input_low``/``input_high`` are ``(in_dim,)``.
    """

    n_params: int
    in_dim: int
    out_dim: int
    low: np.ndarray
    high: np.ndarray
    periodic: np.ndarray
    input_low: np.ndarray
    input_high: np.ndarray
    max_batch: int | None
    theta0: np.ndarray | None
    has_bounds: bool
    free_scale: float | None = None  # unit of unbounded parameters (devices/scale.py)

    @property
    def scale(self) -> np.ndarray:
        """Per-parameter bound width, the unit of trust radii and of SAT's rho; unbounded
        parameters take ``free_scale`` (measured or set), else ``DEFAULT_UNBOUNDED_SCALE``."""
        width = self.high - self.low
        free = DEFAULT_UNBOUNDED_SCALE if self.free_scale is None else self.free_scale
        return np.where(np.isfinite(width), width, free)

    def start(self, seed: int) -> np.ndarray:
        """The shared starting setting: ``theta0`` if given, else the bounds' midpoint plus a
        small seeded jitter. Every method starts from this point for a given seed."""
        if self.theta0 is not None:
            return self.theta0.copy()
        finite = np.isfinite(self.low) & np.isfinite(self.high)
        mid = np.where(
            finite, (np.where(finite, self.low, 0.0) + np.where(finite, self.high, 0.0)) / 2, 0.0
        )
        rng = np.random.default_rng([seed, 7919])
        jitter = rng.uniform(-THETA0_JITTER, THETA0_JITTER, self.n_params) * self.scale
        return self.project(mid + jitter)

    def project(self, theta: np.ndarray) -> np.ndarray:
        """Map a setting back into the domain: periodic parameters wrap into ``[low, high)``,
        others clip (:func:`surrogates.design.wrap`, the one projection rule)."""
        # imported here: the surrogates package loads torch, which --help must not wait for
        from surrogates.design import wrap

        return wrap(theta, self.low, self.high, self.periodic)


def _int_member(device, name: str) -> int:
    if not hasattr(device, name):
        raise DeviceContractError(
            f"device {type(device).__name__} has no member '{name}'; the contract needs "
            "n_params, in_dim, out_dim and query(theta, x) (see docs/design.md)"
        )
    value = getattr(device, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DeviceContractError(f"device.{name} must be a positive int, got {value!r}")
    return int(value)


def _vector(value, n: int, name: str) -> np.ndarray:
    arr = (
        np.broadcast_to(np.asarray(value, dtype=float), (n,))
        if np.ndim(value) == 0
        else np.asarray(value, dtype=float)
    )
    if arr.shape != (n,):
        raise DeviceContractError(
            f"device.{name} must be a scalar or have shape ({n},), got {arr.shape}"
        )
    return arr.copy()


def describe(device) -> DeviceInfo:
    """Read and check the contract members of ``device``.

    Raises :class:`DeviceContractError` naming the first bad member.
    """
    n_params = _int_member(device, "n_params")
    in_dim = _int_member(device, "in_dim")
    out_dim = _int_member(device, "out_dim")
    if not callable(getattr(device, "query", None)):
        raise DeviceContractError("device has no callable query(theta, x)")

    bounds = getattr(device, "bounds", None)
    if bounds is None:
        low, high, has_bounds = np.full(n_params, -np.inf), np.full(n_params, np.inf), False
    else:
        if len(bounds) != 2:
            raise DeviceContractError("device.bounds must be a pair (low, high)")
        low, high = (
            _vector(bounds[0], n_params, "bounds[0]"),
            _vector(bounds[1], n_params, "bounds[1]"),
        )
        if np.any(np.isnan(low)) or np.any(np.isnan(high)) or np.any(low >= high):
            raise DeviceContractError("device.bounds must satisfy low < high for every parameter")
        has_bounds = True

    periodic = getattr(device, "periodic", False)
    periodic = (
        np.broadcast_to(np.asarray(periodic, dtype=bool), (n_params,)).copy()
        if np.ndim(periodic) == 0
        else np.asarray(periodic, dtype=bool)
    )
    if periodic.shape != (n_params,):
        raise DeviceContractError(
            f"device.periodic must be a bool or have shape ({n_params},), got {periodic.shape}"
        )
    if np.any(periodic & ~(np.isfinite(low) & np.isfinite(high))):
        raise DeviceContractError("periodic parameters need finite bounds (one period)")

    ib = getattr(device, "input_bounds", None)
    if ib is None:
        in_low, in_high = np.full(in_dim, -1.0), np.full(in_dim, 1.0)
    else:
        in_low, in_high = (
            _vector(ib[0], in_dim, "input_bounds[0]"),
            _vector(ib[1], in_dim, "input_bounds[1]"),
        )
        if (
            np.any(~np.isfinite(in_low))
            or np.any(~np.isfinite(in_high))
            or np.any(in_low >= in_high)
        ):
            raise DeviceContractError("device.input_bounds must be finite with low < high")

    max_batch = getattr(device, "max_batch", None)
    if max_batch is not None:
        if not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise DeviceContractError(
                f"device.max_batch must be a positive int or None, got {max_batch!r}"
            )
        max_batch = int(max_batch)

    theta0 = getattr(device, "theta0", None)
    info = DeviceInfo(
        n_params, in_dim, out_dim, low, high, periodic, in_low, in_high, max_batch, None, has_bounds
    )
    if theta0 is not None:
        theta0 = check_theta(info, theta0, member="theta0")
        info = DeviceInfo(
            n_params,
            in_dim,
            out_dim,
            low,
            high,
            periodic,
            in_low,
            in_high,
            max_batch,
            theta0,
            has_bounds,
        )
    return info


def check_theta(info: DeviceInfo, theta, member: str = "theta") -> np.ndarray:
    """Validate a setting: shape ``(n_params,)``, real, finite, inside the bounds."""
    arr = np.asarray(theta)
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise DeviceContractError(f"{member} must be a real float array, got dtype {arr.dtype}")
    arr = arr.astype(float)
    if arr.shape != (info.n_params,):
        raise DeviceContractError(
            f"{member} must have shape (n_params,) = ({info.n_params},), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise DeviceContractError(f"{member} has non-finite values at indices {bad}")
    tol = 1e-9 * info.scale
    out = (arr < info.low - tol) | (arr > info.high + tol)
    if np.any(out):
        i = int(np.flatnonzero(out)[0])
        raise DeviceContractError(
            f"{member}[{i}] = {arr[i]:.6g} is outside bounds [{info.low[i]:.6g}, {info.high[i]:.6g}] "
            f"({int(out.sum())} parameters out of bounds); project it with DeviceInfo.project first"
        )
    return np.clip(arr, info.low, info.high)


def check_inputs(info: DeviceInfo, x) -> np.ndarray:
    """Validate a batch of inputs: shape ``(batch, in_dim)``, finite, inside ``input_bounds``."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise DeviceContractError(f"x must be a real float array, got dtype {arr.dtype}")
    arr = arr.astype(float)
    if arr.ndim != 2 or arr.shape[1] != info.in_dim or arr.shape[0] < 1:
        raise DeviceContractError(
            f"x must have shape (batch, in_dim) = (batch, {info.in_dim}) with batch >= 1, got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise DeviceContractError(f"x has {int((~np.isfinite(arr)).sum())} non-finite values")
    tol = 1e-9 * (info.input_high - info.input_low)
    if np.any(arr < info.input_low - tol) or np.any(arr > info.input_high + tol):
        raise DeviceContractError(
            f"x is outside input_bounds [{info.input_low.min():.3g}, {info.input_high.max():.3g}]; "
            "encode inputs onto the device's input range first"
        )
    return np.clip(arr, info.input_low, info.input_high)


def check_outputs(info: DeviceInfo, y, batch: int) -> np.ndarray:
    """Validate what a device returned: shape ``(batch, out_dim)`` and finite."""
    try:
        arr = np.asarray(y, dtype=float)
    except (TypeError, ValueError) as exc:
        raise DeviceOutputError(
            f"device.query returned {type(y).__name__}, not a float array: {exc}"
        ) from exc
    if arr.shape != (batch, info.out_dim):
        raise DeviceOutputError(
            f"device.query returned shape {arr.shape}; the contract needs (batch, out_dim) = ({batch}, {info.out_dim}). "
            "Check the adapter's query()"
        )
    if not np.all(np.isfinite(arr)):
        raise DeviceOutputError(
            f"device.query returned {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf); the query is "
            "kept in the ledger marked bad. Check the instrument (saturation, disconnected detector)"
        )
    return arr
