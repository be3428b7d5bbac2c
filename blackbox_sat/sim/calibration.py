"""Grey-box calibration models of the built-in simulators ("digital twins"): their shared base.

Each simulator module defines its own model next to its physics.

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

- ``mzi`` (:class:`~.mzi.MeshCalibrationModel`): known: the Clements topology, the heater
  crosstalk structure and its ``kappa`` (set by the heater pitch, the same on every chip of a
  design; it is in the simulator's datasheet view too). Unknown: every coupler's splitting
  error ``bs_error (M, 2)``, every shifter's phase offset ``phase_bias (2M,)`` rad (which
  absorbs drift: truth is ``phase_offset + beta_j * drift``) and each detector's relative
  gain ``gain (N,)`` (truth 1: the simulator's detectors are ideal unless a model-form error
  such as ``arm_loss`` dims them).
- ``mrr`` (:class:`~.mrr.RingCalibrationModel`): known: the bank's shape, the datasheet ``DETUNE0``,
  ``ETA``, ``FWHM`` and the crosstalk ``kappa``. Unknown per ring: resonance offset ``offset``
  nm (absorbs drift), log heater-efficiency gain ``log_heater`` and log linewidth ratio
  ``log_width``.
- ``freespace`` (:class:`~.freespace.MaskCalibrationModel`): known: mask geometry, pixels per weight and
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
        self.register_buffer(
            f"_scale_{name}",
            torch.broadcast_to(
                torch.as_tensor(np.asarray(scale, float), dtype=_F64), p.shape
            ).clone(),
        )

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
            raise ValueError(
                f"truth has {sorted(truth)}, the model's parameters are {sorted(params)}"
            )
        for n, v in truth.items():
            params[n].copy_(torch.as_tensor(v, dtype=_F64).reshape(params[n].shape))
        return self


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
