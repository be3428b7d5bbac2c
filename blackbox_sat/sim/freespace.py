"""``freespace``: an optical vector-matrix multiplier whose mask can be misaligned.

Physics (docs/protocol.md, "The built-in simulators")
---------------------------------------
- **Mask.** An SLM/DMD displays the weights as an image of ``2 out_dim x in_dim`` blocks,
  each ``p x p`` pixels (``p = pixels_per_weight``, default 4): ``H = 2 out_dim p`` rows,
  ``W = in_dim p`` columns. Block row ``2j`` holds output ``j``'s positive weights, row
  ``2j + 1`` its negative ones (a differential pair of adjacent rows). Each block shows one
  grey level ``theta`` in [0, 1], its intensity transmission (a linearised display LUT).
- **Optics.** Input ``x_i`` (an intensity, ``input_bounds = [0, 1]``) is fanned out over the
  optical-grid column band ``i`` (a cylindrical lens); a second lens sums each row band of
  the optical grid onto one detector. So detector ``r`` reads
  ``det_r = sum_i x_i A[r, i]``, with ``A[r, i]`` the mean of the warped mask over the grid
  cell ``(r, i)``. Output ``y_j = G_2j f(det_2j) - G_2j+1 f(det_2j+1)`` (balanced pair), in
  units of one fully open block under unit input; nominal ``y = W x`` with
  ``W = theta_+ - theta_-`` in [-1, 1]; ``full_scale = in_dim``.
- **Misalignment** (post-deployment; true model only). The mask image reaches the optical
  grid through ``q = c + scale * Rot(rotation) (m - c) + (shift, shift)``: ``m`` a mask
  position, ``q`` the optical-grid position (pixels, ``(column, row)``, pixel centres at
  integers, ``c`` the mask centre), ``rotation`` in degrees (positive turns +column towards
  +row), ``shift`` in pixels along both axes (or a pair ``(dx, dy)``), ``scale`` the
  magnification. Every optical pixel samples the mask at ``m(q)`` by bilinear interpolation
  (zero outside the mask), so each detector sees a blend of neighbouring blocks; as in the
  paper, an affine warp of the weight image. The identity warp samples pixel centres at pixel
  centres and is exact. A vertical error blends a block with the other half of its
  differential pair, so it can even flip a weight's sign.
- **Fabrication** (``sigma``, default 0.03; standard normals drawn once from ``chip_rng``,
  pixels then detectors, and scaled): per-pixel response non-uniformity, gain
  ``exp(sigma z)`` (3 % at the default, inside the usual 2-5 %); detector gain per
  row ``G_r = exp(sigma / 3 z)`` (1 %: photodiode responsivity and TIA resistor tolerance of
  a balanced receiver). The pixel gains travel with the mask through the warp. A pixel's error
  averages over the ``p^2`` pixels of a block, but a detector's does not, and a gain mismatch
  in a balanced pair leaks the common mode ``(theta_+ + theta_-) / 2`` into the output.
- **Detector nonlinearity** (``nonlinearity``, off by default): ``f(d) = s (1 - exp(-d/s))``,
  a saturating photodetector/amplifier with ``s = in_dim / 4`` for ``True`` or the given
  float (output units). Off: ``f(d) = d``. It is in both views (a design choice, not an error).
- **Query noise** (applied by :meth:`SimulatedDevice.query`): 12-bit DAC over [0, 1] (set
  ``dac_bits=8`` for a typical 8-bit display); programming noise 0.002 grey levels (about half
  an 8-bit level: display flicker), then clipped to [0, 1]; read noise 0.003 of full scale,
  the ~6.6-effective-bit ADC figure also used by ``mzi``.

Views: ``nominal_model()``: identity warp, uniform pixels and detectors. ``true_model()``
adds the chip's gains and the warp. With ``sigma = 0`` and no misalignment they coincide.

Controls: ``theta[(2 j + s) * in_dim + i]``, ``s = 0`` positive / 1 negative: the block image
``theta.reshape(2 out_dim, in_dim)`` row-major, exactly as displayed. ``theta0``: the fixed
chip-independent starting weights ``w0 ~ U(-0.25, 0.25)`` of :func:`.mrr.start_weights` shown
as ``0.5 +- w0 / 2`` (nominal weights ``w0``); the bounds' midpoint would give ``W = 0`` and
no output spread to set the readout gain from.

Implementation: the whole chain theta -> ``A`` is linear, so the warp, pixel gains and
pooling are precomputed into one ``(R C, R C)`` matrix (``R = 2 out_dim``, ``C = in_dim``);
a forward pass is two small matrix products.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SimulatedDevice
from .calibration import _F64, CalibrationModelBase
from .mrr import start_weights

SIGMA = 0.03  # per-pixel gain std (relative); detectors get SIGMA / 3
DETECTOR_PER_SIGMA = 1 / 3
PIXELS_PER_WEIGHT = 4
READ_NOISE = 0.003  # fraction of full scale
PROGRAMMING_NOISE = 0.002  # grey levels


def bilinear_taps(
    height: int,
    width: int,
    rotation: float = 0.0,
    shift: float | tuple[float, float] = 0.0,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Where each optical-grid pixel samples the mask. Returns ``index (H*W, 4)`` into the
    flattened mask and ``weight (H*W, 4)`` (0 for taps outside the mask)."""
    pair = np.asarray(shift, float)
    dx, dy = (float(pair), float(pair)) if pair.ndim == 0 else map(float, pair)
    rows, cols = np.meshgrid(
        np.arange(height, dtype=float), np.arange(width, dtype=float), indexing="ij"
    )
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a = np.deg2rad(rotation)
    cos, sin = np.cos(a), np.sin(a)
    qx, qy = (cols - cx - dx) / scale, (rows - cy - dy) / scale  # inverse of the forward map
    mx, my = cx + cos * qx + sin * qy, cy - sin * qx + cos * qy
    x0, y0 = np.floor(mx), np.floor(my)
    fx, fy = mx - x0, my - y0
    index, weight = [], []
    for oy, ox, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (0, 1, fx * (1 - fy)),
        (1, 0, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xs, ys = x0 + ox, y0 + oy
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        index.append(np.where(inside, ys * width + xs, 0).astype(np.int64).ravel())
        weight.append(np.where(inside, w, 0.0).ravel())
    return np.stack(index, 1), np.stack(weight, 1)


class MaskModel(torch.nn.Module):
    """``model(theta (R*C,), x (batch, C)) -> (batch, R/2)``, differentiable in both, in
    ``theta``'s dtype. Buffers: ``transfer (R*C, R*C)`` theta -> cell means ``A``,
    ``det_gain (R,)``; ``saturation`` None or output units."""

    transfer: torch.Tensor
    det_gain: torch.Tensor

    def __init__(
        self, transfer: np.ndarray, det_gain: np.ndarray, in_dim: int, saturation: float | None
    ):
        super().__init__()
        self.in_dim, self.saturation = int(in_dim), saturation
        self.register_buffer("transfer", torch.as_tensor(transfer))
        self.register_buffer("det_gain", torch.as_tensor(np.asarray(det_gain, float)))

    def cells(self, theta: torch.Tensor) -> torch.Tensor:
        """``A (R, C)``: mean warped transmission of each optical-grid cell."""
        return (self.transfer.to(theta.dtype) @ theta).reshape(-1, self.in_dim)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        det = x.to(theta.dtype) @ self.cells(theta).T  # (batch, R)
        if self.saturation is not None:
            det = self.saturation * -torch.expm1(-det / self.saturation)
        det = det * self.det_gain.to(theta.dtype)
        return det[:, 0::2] - det[:, 1::2]


class MaskCalibrationModel(CalibrationModelBase):
    """Free-space VMM with unknown misalignment and gains (``freespace``).

    Parameters: ``rotation`` deg (datasheet 0, scale ``rotation_scale``), ``shift (2,)`` px
    ``(dx, dy)`` (0, ``shift_scale``), ``scale`` (1, ``scale_scale``), ``log_pixel_gain
    (H, W)`` (0, ``sigma``), ``log_det_gain (2 out_dim,)`` (0, ``sigma / 3``). The warp is
    the simulator's bilinear sampling written in torch, so the transfer matrix is
    differentiable in the geometry (piecewise: the taps move at pixel boundaries)."""

    rotation: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    log_pixel_gain: torch.Tensor
    log_det_gain: torch.Tensor
    grid_r: torch.Tensor
    grid_c: torch.Tensor
    cell: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        pixels_per_weight: int,
        saturation: float | None,
        sigma: float = 0.03,
        detector_per_sigma: float = 1 / 3,
        rotation_scale: float = 1.0,
        shift_scale: float = 1.0,
        scale_scale: float = 0.02,
    ):
        super().__init__()
        self.out_dim, self.in_dim, self.p = int(out_dim), int(in_dim), int(pixels_per_weight)
        self.rows = 2 * self.out_dim
        self.height, self.width = self.rows * self.p, self.in_dim * self.p
        self.n_params = self.rows * self.in_dim
        self.saturation = None if saturation is None else float(saturation)
        self._add("rotation", 0.0, rotation_scale)
        self._add("shift", np.zeros(2), shift_scale)
        self._add("scale", 1.0, scale_scale)
        self._add("log_pixel_gain", np.zeros((self.height, self.width)), max(sigma, 1e-3))
        self._add("log_det_gain", np.zeros(self.rows), max(sigma * detector_per_sigma, 1e-3))
        rows, cols = np.meshgrid(
            np.arange(self.height, dtype=float), np.arange(self.width, dtype=float), indexing="ij"
        )
        self.register_buffer("grid_r", torch.as_tensor(rows.ravel()))
        self.register_buffer("grid_c", torch.as_tensor(cols.ravel()))
        cell = (rows.ravel().astype(np.int64) // self.p) * self.in_dim + cols.ravel().astype(
            np.int64
        ) // self.p
        self.register_buffer("cell", torch.as_tensor(cell))

    def transfer(self) -> torch.Tensor:
        """``(R*C, R*C)``: block values -> mean warped, gain-weighted transmission per cell."""
        h, w = self.height, self.width
        cx, cy = (w - 1) / 2, (h - 1) / 2
        a = torch.deg2rad(self.rotation)
        cos, sin = torch.cos(a), torch.sin(a)
        qx = (self.grid_c - cx - self.shift[0]) / self.scale
        qy = (self.grid_r - cy - self.shift[1]) / self.scale
        mx, my = cx + cos * qx + sin * qy, cy - sin * qx + cos * qy
        x0, y0 = torch.floor(mx).detach(), torch.floor(my).detach()
        fx, fy = mx - x0, my - y0
        gain = torch.exp(self.log_pixel_gain).reshape(-1)
        n = self.n_params
        flat = torch.zeros(n * n, dtype=_F64, device=gain.device)
        for oy, ox, wt in (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            xs, ys = x0 + ox, y0 + oy
            inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
            xs_i = torch.where(inside, xs, torch.zeros_like(xs)).long()
            ys_i = torch.where(inside, ys, torch.zeros_like(ys)).long()
            index = ys_i * w + xs_i
            block = (ys_i // self.p) * self.in_dim + xs_i // self.p
            contrib = torch.where(inside, wt, torch.zeros_like(wt)) * gain[index]
            flat = flat.index_add(0, self.cell * n + block, contrib)
        return flat.reshape(n, n) / self.p**2

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = thetas.dtype
        cells = (thetas @ self.transfer().to(dt).T).reshape(thetas.shape[0], self.rows, self.in_dim)
        det = torch.matmul(x.to(dt), cells.transpose(1, 2))  # (S, B, R)
        if self.saturation is not None:
            det = self.saturation * -torch.expm1(-det / self.saturation)
        det = det * torch.exp(self.log_det_gain.to(dt))
        return det[..., 0::2] - det[..., 1::2]


class FreeSpaceVMM(SimulatedDevice):
    """One free-space VMM; physics, units and sources in the module docstring.

    Chip draws (rescaled by sigma): ``pixel_gain (H, W)``, ``detector_gain (2 out_dim,)``."""

    input_bounds = (0.0, 1.0)

    def __init__(
        self,
        seed: int = 0,
        sigma: float = SIGMA,
        noise: float = READ_NOISE,
        in_dim: int = 16,
        out_dim: int = 10,
        rotation: float = 0.0,
        shift: float | tuple[float, float] = 0.0,
        scale: float = 1.0,
        pixels_per_weight: int = PIXELS_PER_WEIGHT,
        nonlinearity: bool | float = False,
        programming_noise: float = PROGRAMMING_NOISE,
        dac_bits: int | None = 12,
    ):
        if int(in_dim) < 1 or int(out_dim) < 1 or int(pixels_per_weight) < 1 or not scale > 0:
            raise ValueError("in_dim, out_dim, pixels_per_weight must be >= 1 and scale > 0")
        self.in_dim, self.out_dim, self.p = int(in_dim), int(out_dim), int(pixels_per_weight)
        self.full_scale = float(self.in_dim)  # read by SimulatedDevice.__init__ for ReadNoise
        super().__init__(
            seed=seed,
            noise=noise,
            programming_noise=programming_noise,
            dac_bits=dac_bits,
            sigma=sigma,
            in_dim=in_dim,
            out_dim=out_dim,
            rotation=rotation,
            shift=shift,
            scale=scale,
            pixels_per_weight=pixels_per_weight,
            nonlinearity=nonlinearity,
        )
        self.rows = 2 * self.out_dim
        self.height, self.width = self.rows * self.p, self.in_dim * self.p
        self.n_params = self.rows * self.in_dim
        self.bounds = (np.zeros(self.n_params), np.ones(self.n_params))
        self.sigma, self.rotation, self.shift, self.scale = (
            float(sigma),
            float(rotation),
            shift,
            float(scale),
        )
        self.saturation: float | None
        if nonlinearity is True:
            self.saturation = self.in_dim / 4
        elif nonlinearity is False or nonlinearity is None:
            self.saturation = None
        else:
            self.saturation = float(nonlinearity)
        z_pixel = self.chip_rng.standard_normal((self.height, self.width))  # fixed order
        z_det = self.chip_rng.standard_normal(self.rows)
        self.pixel_gain = np.exp(self.sigma * z_pixel)
        self.detector_gain = np.exp(self.sigma * DETECTOR_PER_SIGMA * z_det)
        w0 = start_weights(self.out_dim, self.in_dim)
        self.theta0 = np.stack([0.5 + w0 / 2, 0.5 - w0 / 2], 1).ravel()

    # -- images ------------------------------------------------------------------------
    def mask_image(self, theta: np.ndarray) -> np.ndarray:
        """The displayed image ``(H, W)``: each block value repeated over its ``p x p`` pixels."""
        blocks = np.asarray(theta, float).reshape(self.rows, self.in_dim)
        return np.kron(blocks, np.ones((self.p, self.p)))

    def taps(self, nominal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear taps of :func:`bilinear_taps` for this chip's misalignment (identity if nominal)."""
        if nominal:
            return bilinear_taps(self.height, self.width)
        return bilinear_taps(self.height, self.width, self.rotation, self.shift, self.scale)

    def warp(self, image: np.ndarray, nominal: bool = False) -> np.ndarray:
        """An ``(H, W)`` mask-plane image as it lands on the optical grid ``(H, W)``."""
        index, weight = self.taps(nominal)
        return (
            (np.asarray(image, float).ravel()[index] * weight)
            .sum(1)
            .reshape(self.height, self.width)
        )

    def _transfer(self, nominal: bool) -> np.ndarray:
        """``(R*C, R*C)``: block values -> mean of the warped, gain-weighted mask per grid cell."""
        index, weight = self.taps(nominal)
        gain = np.ones(self.height * self.width) if nominal else self.pixel_gain.ravel()
        rows, cols = np.divmod(np.arange(self.height * self.width), self.width)
        cell = (rows // self.p) * self.in_dim + cols // self.p  # optical-grid cell
        src_r, src_c = np.divmod(index, self.width)
        block = (src_r // self.p) * self.in_dim + src_c // self.p  # mask block of each tap
        transfer = np.zeros((self.n_params, self.n_params))
        np.add.at(
            transfer, (np.broadcast_to(cell[:, None], index.shape), block), weight * gain[index]
        )
        return transfer / self.p**2

    def _build_model(self, nominal: bool) -> torch.nn.Module:
        gain = np.ones(self.rows) if nominal else self.detector_gain
        return MaskModel(self._transfer(nominal), gain, self.in_dim, self.saturation)

    def calibration_model(self) -> torch.nn.Module:
        """Grey-box model for calibration (:class:`~.calibration.MaskCalibrationModel`): known
        geometry and detector nonlinearity, unknown rotation, shift, scale, pixel and detector
        gains at their datasheet values (identity warp, unit gains); prior scales 1 deg, 1 px,
        0.02, ``sigma`` and ``sigma / 3`` (``sigma`` 0.03 where it is 0)."""
        return MaskCalibrationModel(
            self.out_dim,
            self.in_dim,
            self.p,
            self.saturation,
            sigma=self.sigma or SIGMA,
            detector_per_sigma=DETECTOR_PER_SIGMA,
        )

    def calibration_truth(self) -> dict[str, torch.Tensor]:
        """This chip's values of :meth:`calibration_model`'s parameters: loaded with
        ``model.load_truth``, the model equals :meth:`true_model`."""
        f64 = torch.float64
        pair = np.asarray(self.shift, float)
        shift = (float(pair), float(pair)) if pair.ndim == 0 else tuple(pair)
        return {
            "rotation": torch.tensor(self.rotation, dtype=f64),
            "shift": torch.tensor(shift, dtype=f64),
            "scale": torch.tensor(self.scale, dtype=f64),
            "log_pixel_gain": torch.as_tensor(np.log(self.pixel_gain), dtype=f64),
            "log_det_gain": torch.as_tensor(np.log(self.detector_gain), dtype=f64),
        }

    def applied_setting(self, theta: np.ndarray) -> np.ndarray:
        """DAC, programming noise, then the display's range [0, 1]."""
        return np.clip(super().applied_setting(theta), 0.0, 1.0)

    def cells(self, theta: np.ndarray, nominal: bool = False) -> np.ndarray:
        """``A (2 out_dim, in_dim)`` of this chip (or the datasheet) at ``theta``."""
        model = self.nominal_model() if nominal else self.true_model()
        assert isinstance(model, MaskModel)
        with torch.no_grad():
            return model.cells(torch.as_tensor(np.asarray(theta, float))).numpy()


def freespace(
    seed: int = 0,
    sigma: float = SIGMA,
    noise: float = READ_NOISE,
    in_dim: int = 16,
    out_dim: int = 10,
    rotation: float = 0.0,
    shift: float | tuple[float, float] = 0.0,
    scale: float = 1.0,
    pixels_per_weight: int = PIXELS_PER_WEIGHT,
    nonlinearity: bool | float = False,
    programming_noise: float = PROGRAMMING_NOISE,
    dac_bits: int | None = 12,
    **kw,
) -> FreeSpaceVMM:
    """A free-space VMM. ``sigma``: pixel gain std (relative; detectors ``sigma/3``). ``noise``: read noise
    std, fraction of full scale (``in_dim``). ``rotation`` degrees, ``shift`` pixels (both axes,
    or ``(dx, dy)``), ``scale`` magnification. ``nonlinearity``: False, True or a saturation level.
    ``programming_noise``: grey levels rms per query. ``dac_bits``: None for off."""
    return FreeSpaceVMM(
        seed=seed,
        sigma=sigma,
        noise=noise,
        in_dim=in_dim,
        out_dim=out_dim,
        rotation=rotation,
        shift=shift,
        scale=scale,
        pixels_per_weight=pixels_per_weight,
        nonlinearity=nonlinearity,
        programming_noise=programming_noise,
        dac_bits=dac_bits,
        **kw,
    )
