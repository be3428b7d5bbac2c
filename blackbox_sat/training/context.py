"""What a training method is handed: metered device, encoded data, PNN, budget, config.

Black-box methods use only ``ctx.device`` (metered queries) and the arrays here. The raw
device object (``ctx.source``) is for model-based methods, which ask it for
``nominal_model()`` or ``true_model()`` through :meth:`TrainContext.model`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blackbox_sat.devices.contract import MissingCapability
from blackbox_sat.devices.metered import MeteredDevice

from .pnn import PNN, readout_correct

#: Settings at which ``curve`` snapshots are taken (docs/protocol.md), scaled by budget / 2000;
#: 200 and 400 are a tenth and a fifth of the budget, where settings-to-target is judged.
CURVE_CHECKPOINTS = (200, 250, 400, 500, 1000, 2000)
#: Most inputs measured in one training setting (docs/protocol.md).
MINIBATCH = 128
#: The phase shown for a charged query's purpose until a method names its own (``phase``).
AUTO_PHASE = {"probe": "initial design", "train": "training", "refine": "zeroth-order steps"}
#: The progress line's device loss is the mean over this many recent training minibatches.
LOSS_WINDOW = 10


def _key(row: np.ndarray) -> bytes:
    """A device input row as a dict key; rounded, since a batch and the whole set may be
    encoded with different float rounding."""
    return (np.round(np.asarray(row, dtype=float), 6) + 0.0).tobytes()  # + 0.0: no -0.0


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
    progress: Any = None  # a progress bar (tqdm: ``n``, ``refresh()``) or None
    curve: list = field(default_factory=list)
    rng: np.random.Generator | None = None  # None: seeded from ``seed`` in __post_init__
    init_calibration: str | None = None  # calibration.pt of the run given to --init-from

    def __post_init__(self) -> None:
        if self.rng is None:
            self.rng = np.random.default_rng([self.seed, 1234])
        scale = self.budget / CURVE_CHECKPOINTS[-1]
        self._checkpoints = sorted({max(1, round(c * scale)) for c in CURVE_CHECKPOINTS})
        self._phase, self._named = "", False
        self._losses: deque = deque(maxlen=LOSS_WINDOW)
        self._acc0: float | None = None
        self._labels: dict | None = None
        if self.progress is not None:
            self.device.observers.append(self._observe)

    @property
    def info(self):
        return self.device.info

    def settings_left(self) -> int:
        """Settings the budget has left (the device's own count, or ``budget`` less those
        used where the device is not metered by a budget)."""
        left = self.device.remaining
        return left if left is not None else max(0, self.budget - self.device.settings_used)

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
        return readout_correct(self.pnn, out, y) / len(y)

    # --- progress: what is happening, the device loss, where it started ------------------
    def phase(self, name: str) -> None:
        """Name what the method is doing now (``"surrogate fit"``, ``"round 3"``); shown on the
        progress line at once, so a long step with no query reads as work, not a hang.

        Until a method names a phase, the purpose of its queries names it (:data:`AUTO_PHASE`);
        after that, zeroth-order queries (purpose ``refine``) show as ``refinement``."""
        self._phase, self._named = name, True
        self._show(refresh=True)

    def start_curve(self, theta0: np.ndarray) -> None:
        """The curve's first point: test accuracy at ``theta0`` before any training (0
        settings), logged as ``eval``; the progress line shows it beside chance."""
        self._acc0 = self.device_accuracy(theta0, "test", "eval")
        self.curve.append(
            {"settings": 0, "settings_used": self.device.settings_used, "accuracy": self._acc0}
        )
        self._show(refresh=True)

    def _observe(self, purpose: str, x: np.ndarray, y: np.ndarray) -> None:
        """Device-query observer: the phase from the purpose, the loss of training inputs."""
        auto = AUTO_PHASE.get(purpose)
        if auto is not None and not self._named:
            self._phase = auto
        elif purpose == "refine":  # zeroth-order steps after named phases: the refinement
            self._phase = "refinement"
        if auto is None or (purpose == "probe" and self._named):
            return  # once training runs, probes around it would only blur its loss
        if self._labels is None:  # the training set's device inputs -> label
            rows = np.clip(
                self.device_inputs(self.f_train), self.info.input_low, self.info.input_high
            )
            self._labels = {_key(r): int(c) for r, c in zip(rows, self.y_train)}
        found = [
            (i, self._labels[k])
            for i, k in enumerate(map(_key, np.asarray(x)))
            if k in self._labels
        ]
        if found and 2 * len(found) >= len(x):  # a hybrid PNN's inputs move with training: none
            rows, labels = zip(*found)
            with torch.no_grad():
                logits = self.pnn(torch.as_tensor(np.asarray(y)[list(rows)]))
                loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels))
            self._losses.append(float(loss))
        self._show(refresh=False)

    def _show(self, refresh: bool) -> None:
        if self.progress is None or not hasattr(self.progress, "set_postfix_str"):
            return
        parts = [self._phase] if self._phase else []
        if self._losses:
            parts.append(f"device loss {np.mean(self._losses):.3f}")
        if self._acc0 is not None:
            parts.append(
                f"acc at theta0 {100 * self._acc0:.0f}% (chance {100 / self.pnn.n_classes:.0f}%)"
            )
        self.progress.set_postfix_str(" | ".join(parts), refresh=refresh)

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
        assert self.rng is not None, "set in __post_init__"
        while True:
            order = self.rng.permutation(n)
            for i in range(0, n - size + 1 if n >= size else 1, size):
                yield order[i : i + size]
