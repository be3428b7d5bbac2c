"""The physical neural network around the device: fixed encoding, device, readout.

- **device-only** (default): inputs reach the device through the fixed encoding of
  docs/protocol.md; logits are ``gain * y[:, :n_classes]``. Only ``theta`` is trained.
- **hybrid** (``pnn=hybrid``): a trainable digital input layer maps up to 64 PCA features
  onto the device inputs (hardtanh onto ``input_bounds``), and a trainable digital readout
  maps all ``out_dim`` gained outputs to the classes. Both start as the identity of the
  device-only PNN, so a hybrid run starts from exactly the same network.

The readout gain is measured once from the device's output spread at ``theta0`` and frozen
(:func:`calibrate_gain`); ``evaluate`` never re-measures it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blackbox_sat.data.encoding import FixedEncoding
from blackbox_sat.devices.contract import InvalidInput

#: Logits at theta0 span about +-LOGIT_HALF_SPAN (docs/protocol.md).
LOGIT_HALF_SPAN = 5.0
#: Training inputs measured in the one calibration setting.
CALIBRATION_INPUTS = 32
#: Most PCA features the hybrid input layer sees.
HYBRID_FEATURES = 64

PNN_MODES = ("device", "hybrid")


def calibrate_gain(y: np.ndarray, n_classes: int) -> float:
    """Gain so that ``gain * y[:, :n_classes]`` spans about ``2 * LOGIT_HALF_SPAN``.

    ``y (batch, out_dim)``: outputs measured at ``theta0``. The spread is the 5–95 %
    interquantile range, robust to a stray noisy sample.
    """
    vals = np.asarray(y, float)[:, :n_classes]
    spread = float(np.quantile(vals, 0.95) - np.quantile(vals, 0.05))
    if not np.isfinite(spread) or spread <= 1e-12 * max(1.0, float(np.abs(vals).max())):
        raise InvalidInput(
            "the device's first n_classes outputs do not vary across inputs at theta0, so no readout gain can "
            "be set; check that the device responds to its inputs (check-device) or give a different theta0"
        )
    return 2 * LOGIT_HALF_SPAN / spread


def readout_loss(pnn: nn.Module, y: torch.Tensor | np.ndarray, labels) -> torch.Tensor:
    """Cross-entropy of the PNN's logits for measured outputs ``y (B, out_dim)`` against
    ``labels (B,)``: the one training loss every method measures (a scalar tensor)."""
    return F.cross_entropy(pnn(torch.as_tensor(y)), torch.as_tensor(labels))


def readout_correct(pnn: nn.Module, y, labels) -> int:
    """How many of the outputs ``y (B, out_dim)`` the PNN classifies as ``labels (B,)``."""
    with torch.no_grad():
        return int((pnn(torch.as_tensor(y)).argmax(1).numpy() == np.asarray(labels)).sum())


class PNN(nn.Module):
    """Encoding, device interface and readout; the digital layers are torch parameters.

    ``features(x_raw) -> (n, n_features)`` numpy; ``device_inputs(f) -> (n, in_dim)`` torch
    (within ``input_bounds``); ``forward(y) -> logits (n, n_classes)``.
    """

    gain: torch.Tensor
    in_low: torch.Tensor
    in_high: torch.Tensor
    input_layer: nn.Linear  # hybrid mode only, as is readout
    readout: nn.Linear

    def __init__(
        self,
        encoding: FixedEncoding,
        n_classes: int,
        out_dim: int,
        input_low: np.ndarray,
        input_high: np.ndarray,
        mode: str = "device",
        gain: float = 1.0,
    ):
        super().__init__()
        if mode not in PNN_MODES:
            raise ValueError(f"pnn must be one of {PNN_MODES}, got {mode!r}")
        if n_classes > out_dim:
            raise InvalidInput(
                f"the task has {n_classes} classes but the device has only {out_dim} outputs"
            )
        self.encoding, self.mode, self.n_classes, self.out_dim = (
            encoding,
            mode,
            int(n_classes),
            int(out_dim),
        )
        self.register_buffer("gain", torch.tensor(float(gain), dtype=torch.float64))
        self.register_buffer("in_low", torch.as_tensor(np.asarray(input_low, float)))
        self.register_buffer("in_high", torch.as_tensor(np.asarray(input_high, float)))
        in_dim = self.in_low.numel()
        if mode == "hybrid":
            n_feat = encoding.n_components
            self.input_layer = nn.Linear(n_feat, in_dim, dtype=torch.float64)
            self.readout = nn.Linear(out_dim, n_classes, dtype=torch.float64)
            with torch.no_grad():
                self.input_layer.weight.copy_(torch.eye(in_dim, n_feat, dtype=torch.float64))
                self.input_layer.bias.zero_()
                self.readout.weight.copy_(torch.eye(n_classes, out_dim, dtype=torch.float64))
                self.readout.bias.zero_()

    @classmethod
    def build(cls, x_train: np.ndarray, n_classes: int, info, mode: str = "device") -> PNN:
        """Fit the fixed encoding on ``x_train (n, n_raw)`` for a device described by ``info``."""
        if mode == "hybrid":
            enc = FixedEncoding.fit(
                x_train,
                info.in_dim,
                info.input_low,
                info.input_high,
                n_components=min(HYBRID_FEATURES, x_train.shape[1]),
                map_to_bounds=False,
            )
        else:
            enc = FixedEncoding.fit(x_train, info.in_dim, info.input_low, info.input_high)
        return cls(enc, n_classes, info.out_dim, info.input_low, info.input_high, mode)

    @property
    def trainable(self) -> bool:
        return self.mode == "hybrid"

    def features(self, x_raw: np.ndarray) -> np.ndarray:
        return self.encoding.transform(x_raw)

    def device_inputs(self, feats) -> torch.Tensor:
        """Map features ``(n, n_features)`` to device inputs ``(n, in_dim)``."""
        feats = torch.as_tensor(feats, dtype=torch.float64)
        if self.mode == "device":
            return feats
        u = nn.functional.hardtanh(self.input_layer(feats))
        return self.in_low + (u + 1) / 2 * (self.in_high - self.in_low)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, n_classes)`` from device outputs ``y (n, out_dim)``."""
        z = self.gain.to(y.dtype) * y
        if self.mode == "device":
            return z[:, : self.n_classes]
        return nn.functional.linear(
            z, self.readout.weight.to(y.dtype), self.readout.bias.to(y.dtype)
        )

    # --- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "mode": self.mode,
            "n_classes": self.n_classes,
            "out_dim": self.out_dim,
            "gain": float(self.gain),
            "input_low": self.in_low.tolist(),
            "input_high": self.in_high.tolist(),
            "encoding": self.encoding.to_dict(),
        }
        if self.mode == "hybrid":
            d["digital"] = {
                k: v.tolist()
                for k, v in self.state_dict().items()
                if k.startswith(("input_layer", "readout"))
            }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PNN:
        pnn = cls(
            FixedEncoding.from_dict(d["encoding"]),
            d["n_classes"],
            d["out_dim"],
            np.asarray(d["input_low"]),
            np.asarray(d["input_high"]),
            d["mode"],
            d["gain"],
        )
        if d["mode"] == "hybrid":
            state = {k: torch.tensor(v, dtype=torch.float64) for k, v in d["digital"].items()}
            pnn.load_state_dict(state, strict=False)
        return pnn
