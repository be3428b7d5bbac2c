"""The fixed input encoding of docs/protocol.md: how data reaches a device.

Fitted on the training features only, then frozen:

1. standardize each feature (train mean and standard deviation, ``ddof=0``; a feature with
   zero variance keeps scale 1, so it becomes a constant 0);
2. PCA to ``k = min(n_components, n_features, n_train)`` components (``n_components``, the
   output width, defaults to the device's ``in_dim``), by SVD of the standardized train
   matrix (of its QR factor R when it is tall). Sign convention: the
   largest-magnitude entry of each axis is positive, so fits are deterministic. Components
   with (numerically) zero train variance are dropped: they carry nothing;
3. divide each component by 3 × its train standard deviation and clip to [-1, 1];
4. zero-pad to ``n_components`` and map [-1, 1] linearly onto ``[input_low, input_high]``
   (scalars or ``(n_components,)`` arrays). A padded slot is 0 before the map, so it sits at
   the midpoint of its input range.

The device-only PNN uses ``FixedEncoding.fit(x_train, in_dim, input_low, input_high)``: output
``(n, in_dim)`` within the device's ``input_bounds``.

The hybrid PNN's digital input layer wants more PCA features than the device has inputs, left
in [-1, 1]: ``n_components`` sets the output width (it may exceed ``in_dim``) and
``map_to_bounds=False`` skips step 4's map (the bounds are then ignored)::

    enc = FixedEncoding.fit(x_train, in_dim, n_components=min(n_features, 64), map_to_bounds=False)
    # or: enc = hybrid_features(x_train, max_features=64)

``enc.n_components`` is always the output width; ``enc.n_active`` counts the PCA components
that carry variance (the rest are zero padding).

:meth:`FixedEncoding.to_dict` / :meth:`FixedEncoding.from_dict` store it as plain lists
(JSON-ready, exact round trip: Python's json writes floats with ``repr``), so a trained model
keeps the encoding and ``evaluate`` rebuilds it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Format tag written by :meth:`FixedEncoding.to_dict`.
KIND = "fixed-encoding"
VERSION = 1
#: Components are divided by this many train standard deviations before clipping.
N_STD = 3.0
#: Relative tolerance under which a standard deviation counts as zero.
_REL_TOL = 1e-10


def _bounds(value, in_dim: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(in_dim, float(arr))
    if arr.shape != (in_dim,):
        raise ValueError(f"{name} must be a scalar or have shape ({in_dim},); got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _as_matrix(x, n_features: int | None, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        want = f"(n, {n_features})" if n_features is not None else "(n, n_features)"
        raise ValueError(f"{name} must have shape {want}; got {x.shape}")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"{name} must have shape (n, {n_features}); got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return x


@dataclass(frozen=True, eq=False)
class FixedEncoding:
    """A fitted, frozen encoding ``(n, n_features) -> (n, n_components)``. Build it with
    :meth:`fit`.

    Fields: ``n_components`` the output width (the device's ``in_dim`` unless asked
    otherwise); ``mean``/``scale`` ``(n_features,)`` standardization; ``components``
    ``(k, n_features)`` the ``k = n_active`` PCA axes in standardized space;
    ``component_std`` ``(k,)`` their train standard deviations; ``low``/``high``
    ``(n_components,)`` the output range (``-1``/``1`` when ``map_to_bounds`` is False).
    """

    n_components: int
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    component_std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    map_to_bounds: bool = True

    # -- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        x_train,
        in_dim: int,
        input_low=-1.0,
        input_high=1.0,
        *,
        n_components: int | None = None,
        map_to_bounds: bool = True,
    ) -> FixedEncoding:
        """Fit on training features ``(n_train, n_features)``.

        ``in_dim`` is the device's input width. ``n_components`` (default ``in_dim``; it may
        be larger, for the hybrid PNN) is the output width: PCA keeps at most that many
        components and zero-pads the rest. ``input_low``/``input_high`` (scalars or
        ``(n_components,)``) are the device's ``input_bounds``; they are ignored when
        ``map_to_bounds`` is False.
        """
        in_dim = int(in_dim)
        if in_dim < 1:
            raise ValueError(f"in_dim must be at least 1; got {in_dim}")
        width = in_dim if n_components is None else int(n_components)
        if width < 1:
            raise ValueError(f"n_components must be at least 1; got {width}")
        x = _as_matrix(x_train, None, "x_train")
        n_train, n_features = x.shape
        if n_train < 2:
            raise ValueError(f"x_train needs at least 2 rows to fit an encoding; got {n_train}")
        if map_to_bounds:
            low = _bounds(input_low, width, "input_low")
            high = _bounds(input_high, width, "input_high")
            if np.any(high <= low):
                raise ValueError("input_high must exceed input_low in every coordinate")
        else:
            low, high = np.full(width, -1.0), np.full(width, 1.0)

        mean = x.mean(axis=0)
        std = x.std(axis=0)
        tol = _REL_TOL * np.maximum(1.0, np.abs(mean))
        scale = np.where(std > tol, std, 1.0)
        z = (x - mean) / scale

        k = min(width, n_features, n_train)
        # For a tall matrix, SVD of its R factor gives the same axes far faster (seconds, not
        # a minute, for Fashion-MNIST's 55000 x 784).
        r = np.linalg.qr(z, mode="r") if n_train > n_features else z
        _, _, vt = np.linalg.svd(r, full_matrices=False)
        vt = vt[:k]
        # Deterministic sign: each axis's largest-magnitude entry is positive.
        pivot = np.argmax(np.abs(vt), axis=1)
        signs = np.sign(vt[np.arange(k), pivot])
        signs[signs == 0] = 1.0
        vt = vt * signs[:, None]
        proj = z @ vt.T
        comp_std = proj.std(axis=0)
        # Drop components with no train variance (rank deficiency: n_train <= n_features, or
        # constant features): scaling them up would only amplify rounding noise.
        ref = max(float(comp_std.max(initial=0.0)), 1.0)
        keep = comp_std > _REL_TOL * ref
        return cls(
            n_components=width,
            mean=mean,
            scale=scale,
            components=np.ascontiguousarray(vt[keep]),
            component_std=comp_std[keep],
            low=low,
            high=high,
            map_to_bounds=bool(map_to_bounds),
        )

    # -- applying ------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_active(self) -> int:
        """PCA components that carry variance (the other output slots are padding)."""
        return int(self.components.shape[0])

    def scores(self, x) -> np.ndarray:
        """PCA scores divided by 3 train std, before clipping: ``(n, n_active)``.

        On the training data each column has standard deviation 1/3 and the columns are
        uncorrelated.
        """
        x = _as_matrix(x, self.n_features, "x")
        z = (x - self.mean) / self.scale
        return (z @ self.components.T) / (N_STD * self.component_std)

    def transform(self, x) -> np.ndarray:
        """Encode features ``(n, n_features)`` into ``(n, n_components)`` (device inputs for
        the device-only PNN)."""
        u = np.clip(self.scores(x), -1.0, 1.0)
        padded = np.zeros((u.shape[0], self.n_components))
        padded[:, : u.shape[1]] = u
        return self.low + (padded + 1.0) * 0.5 * (self.high - self.low)

    __call__ = transform

    # -- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain, JSON-serialisable form; :meth:`from_dict` rebuilds it exactly."""
        return {
            "kind": KIND,
            "version": VERSION,
            "n_components": self.n_components,
            "map_to_bounds": self.map_to_bounds,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "components": self.components.tolist(),
            "component_std": self.component_std.tolist(),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FixedEncoding:
        if d.get("kind") != KIND:
            raise ValueError(f"not a stored fixed encoding (kind={d.get('kind')!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"unsupported fixed-encoding version {d.get('version')!r}")
        width = int(d["n_components"])
        mean = np.asarray(d["mean"], dtype=np.float64)
        scale = np.asarray(d["scale"], dtype=np.float64)
        n_features = mean.shape[0]
        comps = np.asarray(d["components"], dtype=np.float64).reshape(-1, n_features)
        comp_std = np.asarray(d["component_std"], dtype=np.float64)
        low = np.asarray(d["low"], dtype=np.float64)
        high = np.asarray(d["high"], dtype=np.float64)
        k = comps.shape[0]
        if (
            scale.shape != (n_features,)
            or comp_std.shape != (k,)
            or k > width
            or low.shape != (width,)
            or high.shape != (width,)
        ):
            raise ValueError("stored fixed encoding has inconsistent shapes")
        return cls(
            n_components=width,
            mean=mean,
            scale=scale,
            components=comps,
            component_std=comp_std,
            low=low,
            high=high,
            map_to_bounds=bool(d["map_to_bounds"]),
        )


def hybrid_features(x_train, max_features: int = 64) -> FixedEncoding:
    """The hybrid PNN's input features: ``min(n_features, max_features)`` PCA components,
    scaled as in steps 1-3 and left in [-1, 1] (no input-bounds map)."""
    x = _as_matrix(x_train, None, "x_train")
    width = min(x.shape[1], int(max_features))
    return FixedEncoding.fit(x, in_dim=width, n_components=width, map_to_bounds=False)
