"""Grey-box calibration models of the built-in simulators ("digital twins").

A calibration model is a ``torch.nn.Module`` ``model(theta (n_params,), x (batch, in_dim)) ->
(batch, out_dim)`` whose ``nn.Parameter`` s are a chip's *unknown* error parameters, started
at their datasheet values; everything the user knows (topology, design constants) is fixed.
Each model here also has

- ``batched(thetas (S, n_params), x (S, batch, in_dim)) -> (S, batch, out_dim)``: all
  settings in one vectorised pass (what :mod:`surrogates.calibrated` fits with);
- ``prior_loss()``: Gaussian negative log-prior ``0.5 * sum(((p - p0) / scale)^2)`` around
  the datasheet ``p0``;
- ``parameter_scale()``: ``{name: scale}``, the process spread of each parameter, used as
  the prior's std and as the unit in which the fit whitens and perturbs parameters.

Loading a simulator's ``calibration_truth()`` into its ``calibration_model()``
(``model.load_truth(truth)``) reproduces ``true_model()`` to rounding.

What is known and what is not (a choice per platform):

- ``mzi`` (:class:`MeshCalibrationModel`): known: the Clements topology, the heater
  crosstalk structure and its ``kappa`` (set by the heater pitch, the same on every chip of a
  design; it is in the simulator's datasheet view too). Unknown: every coupler's splitting
  error ``bs_error (M, 2)`` and every shifter's phase offset ``phase_bias (2M,)`` rad (which
  absorbs drift: truth is ``phase_offset + beta_j * drift``).
- ``mrr`` (:class:`RingCalibrationModel`): known: the bank's shape, the datasheet ``DETUNE0``,
  ``ETA``, ``FWHM`` and the crosstalk ``kappa``. Unknown per ring: resonance offset ``offset``
  nm (absorbs drift), log heater-efficiency gain ``log_heater`` and log linewidth ratio
  ``log_width``.
- ``freespace`` (:class:`MaskCalibrationModel`): known: mask geometry, pixels per weight and
  the detector nonlinearity (a design choice in both views). Unknown: ``rotation`` (deg),
  ``shift`` ``(dx, dy)`` px, ``scale``, per-pixel log gains ``log_pixel_gain (H, W)`` and
  per-detector log gains ``log_det_gain (2 out_dim,)``. Only part of the pixel gains is
  identifiable from outputs (a block's pixels are summed; with no warp only a block's mean
  gain is seen, and it trades with its row's detector gain): compare outputs or the
  geometric parameters, not single pixel gains.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .mrr import DETUNE0, ETA, FWHM, HEATER_R, crosstalk_matrix
from .mzi import _column_maps, _neighbours, clements_layout

_TWO_PI = 2 * math.pi
_EPS_POWER = 1e-12
_F64 = torch.float64


def _param(value) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(np.asarray(value, float), dtype=_F64).clone())


class CalibrationModelBase(nn.Module):
    """Shared: ``forward`` through ``batched``, the Gaussian prior, truth loading.

    Subclasses register parameters with :meth:`_add` (value, datasheet value, scale) and
    implement :meth:`batched`."""

    def _add(self, name: str, value, scale) -> None:
        p = _param(value)
        self.register_parameter(name, p)
        self.register_buffer(f"_p0_{name}", p.detach().clone())
        self.register_buffer(f"_scale_{name}", torch.broadcast_to(
            torch.as_tensor(np.asarray(scale, float), dtype=_F64), p.shape).clone())

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.batched(theta.unsqueeze(0), x.unsqueeze(0))[0]

    def datasheet(self) -> dict[str, torch.Tensor]:
        """The datasheet (starting) value of each parameter."""
        return {n: getattr(self, f"_p0_{n}").clone() for n, _ in self.named_parameters()}

    def parameter_scale(self) -> dict[str, torch.Tensor]:
        """Process spread of each parameter (the prior std), same shapes as the parameters."""
        return {n: getattr(self, f"_scale_{n}").clone() for n, _ in self.named_parameters()}

    def prior_loss(self) -> torch.Tensor:
        """``0.5 * sum(((p - p0) / scale)^2)`` over every parameter (a Gaussian's -log)."""
        total = torch.zeros((), dtype=_F64)
        for n, p in self.named_parameters():
            z = (p - getattr(self, f"_p0_{n}")) / getattr(self, f"_scale_{n}")
            total = total + 0.5 * (z * z).sum()
        return total

    @torch.no_grad()
    def load_truth(self, truth: dict[str, torch.Tensor]) -> CalibrationModelBase:
        """Set every parameter from ``truth`` (e.g. a simulator's ``calibration_truth()``)."""
        params = dict(self.named_parameters())
        if set(truth) != set(params):
            raise ValueError(f"truth has {sorted(truth)}, the model's parameters are {sorted(params)}")
        for n, v in truth.items():
            params[n].copy_(torch.as_tensor(v, dtype=_F64).reshape(params[n].shape))
        return self


class MeshCalibrationModel(CalibrationModelBase):
    """Clements mesh with unknown coupler errors and phase offsets (``mzi``).

    Parameters: ``bs_error (M, 2)`` (unitless, datasheet 0, scale ``sigma``),
    ``phase_bias (2M,)`` rad (datasheet 0, scale ``sigma_phase``); with ``fit_crosstalk`` also
    the scalar ``kappa`` (datasheet ``kappa``, scale ``kappa_scale``), for a design whose
    crosstalk is not trusted. Fixed: topology (and ``kappa`` by default). Same physics as :class:`~blackbox_sat.sim.mzi.MeshModel`, batched over
    settings."""

    def __init__(self, n_modes: int, kappa: float, sigma: float = 0.15, sigma_phase: float = 0.15,
                 fit_crosstalk: bool = False, kappa_scale: float = 0.01):
        super().__init__()
        self.n_modes = n = int(n_modes)
        layout = clements_layout(n)
        m = len(layout)
        self._add("bs_error", np.zeros((m, 2)), sigma)
        self._add("phase_bias", np.zeros(2 * m), sigma_phase)
        if fit_crosstalk:
            self._add("kappa", float(kappa), kappa_scale)
        else:
            self.kappa = float(kappa)
        up, down = _neighbours(layout)
        idx_a, idx_b, perm = _column_maps(layout, n)
        for name, arr in (("up", up), ("down", down), ("idx_a", idx_a), ("idx_b", idx_b), ("perm", perm)):
            self.register_buffer(name, torch.as_tensor(arr))

    def transfer_matrices(self, thetas: torch.Tensor) -> torch.Tensor:
        """``U (S, N, N)`` complex for settings ``thetas (S, n_params)``."""
        real = thetas.dtype
        p = torch.remainder(thetas, _TWO_PI)
        kappa = self.kappa
        if isinstance(kappa, torch.Tensor) or kappa:
            padded = torch.cat([p, p.new_zeros(p.shape[0], 1)], 1)
            kappa = kappa.to(real) if isinstance(kappa, torch.Tensor) else kappa
            p = p + kappa * (padded[:, self.up] + padded[:, self.down])
        a = p + self.phase_bias.to(real)
        m = a.shape[1] // 2
        e = self.bs_error.to(real).clamp(-1 + 1e-9, 1 - 1e-9)
        t, k = torch.sqrt((1 + e) / 2), torch.sqrt((1 - e) / 2)
        t1, t2, k1, k2 = t[:, 0], t[:, 1], k[:, 0], k[:, 1]
        e_th = torch.polar(torch.ones_like(a[:, :m]), a[:, :m])
        e_ph = torch.polar(torch.ones_like(a[:, m:]), a[:, m:])
        t00 = e_ph * (t1 * t2 * e_th - k1 * k2)
        t01 = 1j * (k1 * t2 * e_th + t1 * k2)
        t10 = 1j * e_ph * (t1 * k2 * e_th + k1 * t2)
        t11 = t1 * t2 - k1 * k2 * e_th
        s = thetas.shape[0]
        one = torch.ones(s, 1, dtype=t00.dtype, device=t00.device)
        coef = torch.cat([t00, t01, t10, t11, one, torch.zeros_like(one)], 1)    # (S, 4M + 2)
        col_a = coef[:, self.idx_a].unsqueeze(-1).unbind(1)    # each (S, N, 1)
        col_b = coef[:, self.idx_b].unsqueeze(-1).unbind(1)
        u = torch.eye(self.n_modes, dtype=t00.dtype, device=t00.device).expand(s, -1, -1)
        for a_c, b_c, p_c in zip(col_a, col_b, self.perm.unbind(0)):
            u = a_c * u + b_c * u[:, p_c]
        return u

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = self.transfer_matrices(thetas)
        x = x.to(thetas.dtype)
        x = x / torch.sqrt((x * x).sum(-1, keepdim=True) + _EPS_POWER)
        field = torch.matmul(x.to(u.dtype), u.transpose(1, 2))
        return field.real ** 2 + field.imag ** 2


class RingCalibrationModel(CalibrationModelBase):
    """Microring weight bank with unknown per-ring offsets, heater gains, linewidths (``mrr``).

    Parameters, each ``(out_dim, in_dim)``: ``offset`` nm (resonance red-shift from the
    datasheet; datasheet 0, scale ``sigma * FWHM``), ``log_heater`` (log heater-efficiency
    gain; 0, ``sigma / 4``), ``log_width`` (log linewidth / FWHM; 0, ``sigma / 4``). Fixed:
    ``DETUNE0``, ``ETA * R``, ``FWHM`` and the crosstalk matrix."""

    def __init__(self, out_dim: int, in_dim: int, kappa: float, sigma: float = 0.2,
                 spread_per_sigma: float = 0.25):
        super().__init__()
        self.out_dim, self.in_dim = int(out_dim), int(in_dim)
        shape = (self.out_dim, self.in_dim)
        self._add("offset", np.zeros(shape), sigma * FWHM)
        self._add("log_heater", np.zeros(shape), sigma * spread_per_sigma)
        self._add("log_width", np.zeros(shape), sigma * spread_per_sigma)
        self.register_buffer("coupling", torch.as_tensor(crosstalk_matrix(self.in_dim, kappa)))

    def weights(self, thetas: torch.Tensor) -> torch.Tensor:
        """``(S, out, in)`` signed weights for currents ``thetas (S, n_params)`` mA."""
        dt = thetas.dtype
        current = thetas.reshape(-1, self.out_dim, self.in_dim)
        eff = ETA * HEATER_R * torch.exp(self.log_heater.to(dt))
        shift = (eff * current * current) @ self.coupling.to(dt).T
        u = 2 * (DETUNE0 - self.offset.to(dt) - shift) / (FWHM * torch.exp(self.log_width.to(dt)))
        u2 = u * u
        return (1 - u2) / (1 + u2)

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.to(thetas.dtype), self.weights(thetas).transpose(1, 2))


class MaskCalibrationModel(CalibrationModelBase):
    """Free-space VMM with unknown misalignment and gains (``freespace``).

    Parameters: ``rotation`` deg (datasheet 0, scale ``rotation_scale``), ``shift (2,)`` px
    ``(dx, dy)`` (0, ``shift_scale``), ``scale`` (1, ``scale_scale``), ``log_pixel_gain
    (H, W)`` (0, ``sigma``), ``log_det_gain (2 out_dim,)`` (0, ``sigma / 3``). The warp is
    the simulator's bilinear sampling written in torch, so the transfer matrix is
    differentiable in the geometry (piecewise: the taps move at pixel boundaries)."""

    def __init__(self, out_dim: int, in_dim: int, pixels_per_weight: int, saturation: float | None,
                 sigma: float = 0.03, detector_per_sigma: float = 1 / 3, rotation_scale: float = 1.0,
                 shift_scale: float = 1.0, scale_scale: float = 0.02):
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
        rows, cols = np.meshgrid(np.arange(self.height, dtype=float), np.arange(self.width, dtype=float),
                                 indexing="ij")
        self.register_buffer("grid_r", torch.as_tensor(rows.ravel()))
        self.register_buffer("grid_c", torch.as_tensor(cols.ravel()))
        cell = (rows.ravel().astype(np.int64) // self.p) * self.in_dim + cols.ravel().astype(np.int64) // self.p
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
        for oy, ox, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy),
                           (1, 1, fx * fy)):
            xs, ys = x0 + ox, y0 + oy
            inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
            xs_i = torch.where(inside, xs, torch.zeros_like(xs)).long()
            ys_i = torch.where(inside, ys, torch.zeros_like(ys)).long()
            index = ys_i * w + xs_i
            block = (ys_i // self.p) * self.in_dim + xs_i // self.p
            contrib = torch.where(inside, wt, torch.zeros_like(wt)) * gain[index]
            flat = flat.index_add(0, self.cell * n + block, contrib)
        return flat.reshape(n, n) / self.p ** 2

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = thetas.dtype
        cells = (thetas @ self.transfer().to(dt).T).reshape(thetas.shape[0], self.rows, self.in_dim)
        det = torch.matmul(x.to(dt), cells.transpose(1, 2))                 # (S, B, R)
        if self.saturation is not None:
            det = self.saturation * -torch.expm1(-det / self.saturation)
        det = det * torch.exp(self.log_det_gain.to(dt))
        return det[..., 0::2] - det[..., 1::2]


def parameter_rms(model: nn.Module, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Root-mean-square error of each of ``model``'s parameters against ``truth`` (same units
    as the parameters), plus ``"all"`` over every parameter together."""
    params = dict(model.named_parameters())
    out, sq, count = {}, 0.0, 0
    for n, v in truth.items():
        d = (params[n].detach().double() - torch.as_tensor(v, dtype=_F64)).reshape(-1)
        out[n] = float(d.pow(2).mean().sqrt())
        sq, count = sq + float(d.pow(2).sum()), count + d.numel()
    out["all"] = math.sqrt(sq / max(count, 1))
    return out
