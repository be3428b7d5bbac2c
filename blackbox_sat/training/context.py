"""What a training method is handed: metered device, encoded data, PNN, budget, config.

Black-box methods use only ``ctx.device`` (metered queries) and the arrays here. The raw
device object (``ctx.source``) is for model-based methods, which ask it for
``nominal_model()`` or ``true_model()`` through :meth:`TrainContext.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blackbox_sat.devices.contract import MissingCapability
from blackbox_sat.devices.metered import MeteredDevice

from .pnn import PNN

#: Settings at which ``curve`` snapshots are taken (docs/protocol.md), scaled by budget / 2000.
CURVE_CHECKPOINTS = (250, 500, 1000, 2000)
#: Most inputs measured in one training setting (docs/protocol.md).
MINIBATCH = 128


class ModelUnavailable(MissingCapability):
    """A model-based method was handed a device that offers no such model."""


@dataclass
class TrainContext:
    device: MeteredDevice
    source: object
    pnn: PNN
    f_train: np.ndarray  # (n_train, n_features) encoded features
    y_train: np.ndarray  # (n_train,) labels
    f_val: np.ndarray
    y_val: np.ndarray
    f_test: np.ndarray
    y_test: np.ndarray
    theta0: np.ndarray  # (n_params,)
    seed: int
    config: Any  # the method's frozen configuration dataclass
    budget: int
    progress: object = None
    curve: list = field(default_factory=list)
    rng: np.random.Generator = None
    init_calibration: str | None = None  # calibration.pt of the run given to --init-from

    def __post_init__(self):
        if self.rng is None:
            self.rng = np.random.default_rng([self.seed, 1234])
        scale = self.budget / CURVE_CHECKPOINTS[-1]
        self._checkpoints = sorted({max(1, round(c * scale)) for c in CURVE_CHECKPOINTS})

    @property
    def info(self):
        return self.device.info

    # --- models for model-based methods ------------------------------------------------
    def model(self, which: str) -> torch.nn.Module:
        """``which`` in ``nominal``/``true``: the simulator view, or a clear error."""
        getter = getattr(self.source, f"{which}_model", None)
        if getter is None:
            raise ModelUnavailable(
                f"this method needs the device's {which}_model(), but {type(self.source).__name__} is a black-box "
                "device with no model; use a device-query method (blackbox-sat, spsa, ...) instead"
            )
        return getter()

    # --- accuracy on the device (never used for training decisions when split='test') --
    def device_inputs(self, feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.pnn.device_inputs(feats).numpy()

    def device_accuracy(self, theta: np.ndarray, split: str, purpose: str) -> float:
        """Accuracy on ``split`` measured through the metered device.

        ``purpose='eval'`` is not charged (reporting only); model selection on ``val``
        must pass a charged purpose such as ``train``.
        """
        f, y = (self.f_val, self.y_val) if split == "val" else (self.f_test, self.y_test)
        out = self.device.query(theta, self.device_inputs(f), purpose=purpose)
        with torch.no_grad():
            pred = self.pnn(torch.as_tensor(out)).argmax(1).numpy()
        return float(np.mean(pred == y))

    def snapshot(self, theta: np.ndarray) -> None:
        """Record ``curve`` points for every checkpoint the settings count has passed.

        Called by query-based methods after each step; the test accuracy it measures is
        logged as ``eval`` and never feeds back into training.
        """
        used = self.device.settings_used
        while self._checkpoints and used >= self._checkpoints[0]:
            cp = self._checkpoints.pop(0)
            self.curve.append(
                {
                    "settings": cp,
                    "settings_used": used,
                    "accuracy": self.device_accuracy(theta, "test", "eval"),
                }
            )
        if self.progress is not None:
            self.progress.n = used
            self.progress.refresh()

    def finish_curve(self, theta: np.ndarray) -> None:
        """Fill the checkpoints a run stopped just short of (pairs of settings can leave the
        last one unreached) with the final setting."""
        if self._checkpoints and self.device.settings_used >= self._checkpoints[-1] - 2:
            acc = self.device_accuracy(theta, "test", "eval")
            for cp in self._checkpoints:
                self.curve.append(
                    {"settings": cp, "settings_used": self.device.settings_used, "accuracy": acc}
                )
            self._checkpoints = []

    def minibatches(self, size: int = MINIBATCH):
        """Endless seeded stream of index arrays over the training set, one epoch at a time."""
        n = len(self.y_train)
        while True:
            order = self.rng.permutation(n)
            for i in range(0, n - size + 1 if n >= size else 1, size):
                yield order[i : i + size]
