"""Metered access to a device: validation, batch splitting, budget, ledger and replay.

Every method talks to the device through :class:`MeteredDevice`. One ``query`` call of a
batch larger than ``max_batch`` is split, and every part is one **setting** (one call of
the device's ``query``). Settings with purpose ``eval`` are logged but not charged.

**Replay (resume).** Opened on an existing ledger, the meter first serves calls from the
ledger in order: while the run re-executes deterministically, each call that matches the
next logged row (same purpose, theta and x) gets the logged outputs back without touching
the device or paying again. The first mismatch ends the replay; from then on calls go to
the device. A killed run therefore resumes where it stopped with no query paid twice.
"""

from __future__ import annotations

import time

import numpy as np

from .contract import (
    DeviceInfo,
    DeviceOutputError,
    check_inputs,
    check_outputs,
    check_theta,
    describe,
)
from .ledger import CHARGED, Ledger


class BudgetExhausted(RuntimeError):
    """A charged query would exceed the run's settings budget."""


class MeteredDevice:
    """Wraps any contract device. ``query(theta, x, purpose)`` returns ``(batch, out_dim)``."""

    def __init__(
        self, device, ledger: Ledger | None = None, budget: int | None = None, replay: bool = True
    ):
        self.device = device
        self.info: DeviceInfo = describe(device)
        self.ledger = ledger
        self.budget = budget
        self.settings_used = 0
        self.samples_used = 0
        self.eval_settings = 0
        self.replayed = 0
        self.device_time = 0.0
        self._replay = list(ledger.rows()) if (ledger is not None and replay) else []
        self._replay_pos = 0
        if ledger is not None and callable(getattr(device, "bind_ledger", None)):
            # A served device derives its request ids from the ledger, so that a query retried
            # after a kill, by this or a later process, is answered from the server's journal
            # instead of being measured and paid for twice (see .remote).
            device.bind_ledger(ledger)
        #: Called as ``fn(purpose, x, y)`` after each good part of a query (progress display).
        self.observers: list = []

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.settings_used

    def settings_needed(self, batch: int) -> int:
        mb = self.info.max_batch
        return 1 if mb is None else -(-batch // mb)

    def can_afford(self, n_settings: int) -> bool:
        return self.remaining is None or n_settings <= self.remaining

    def query(self, theta, x, purpose: str = "train") -> np.ndarray:
        theta = check_theta(self.info, theta)
        x = check_inputs(self.info, x)
        mb = self.info.max_batch or x.shape[0]
        parts = [x[i : i + mb] for i in range(0, x.shape[0], mb)]
        if purpose in CHARGED and not self.can_afford(len(parts)):
            raise BudgetExhausted(
                f"query needs {len(parts)} settings but only {self.remaining} of the budget of {self.budget} remain"
            )
        ys = [self._one(theta, p, purpose) for p in parts]
        for fn in self.observers:
            for p, y in zip(parts, ys):
                fn(purpose, p, y)
        return np.concatenate(ys)

    def _count(self, batch: int, purpose: str) -> None:
        if purpose in CHARGED:
            self.settings_used += 1
            self.samples_used += batch
        else:
            self.eval_settings += 1

    def _one(self, theta: np.ndarray, x: np.ndarray, purpose: str) -> np.ndarray:
        cached = self._replayed(theta, x, purpose)
        if cached is not None:
            self._count(x.shape[0], purpose)
            return cached
        t0 = time.perf_counter()
        try:
            y = self.device.query(theta.copy(), x.copy())
            y = check_outputs(self.info, y, x.shape[0])
        except Exception as exc:
            self.device_time += time.perf_counter() - t0
            self._count(x.shape[0], purpose)
            if self.ledger is not None:
                self.ledger.append(
                    theta, x, None, purpose, ok=False, error=f"{type(exc).__name__}: {exc}"
                )
            if isinstance(exc, DeviceOutputError):
                raise
            raise DeviceOutputError(f"device.query raised {type(exc).__name__}: {exc}") from exc
        self.device_time += time.perf_counter() - t0
        self._count(x.shape[0], purpose)
        if self.ledger is not None:
            self.ledger.append(theta, x, y, purpose)
        return y

    def _replayed(self, theta, x, purpose) -> np.ndarray | None:
        while self._replay_pos < len(self._replay):
            row = self._replay[self._replay_pos]
            if not row.ok:  # a bad row was paid for but gives nothing to replay
                self._replay_pos += 1
                self._count(row.x.shape[0], row.purpose)
                continue
            if (
                row.purpose == purpose
                and row.x.shape == x.shape
                and np.array_equal(row.theta, theta)
                and np.array_equal(row.x, x)
            ):
                self._replay_pos += 1
                self.replayed += 1
                return row.y.copy()
            # Reports (``eval``, uncharged) never steer training, so one that the log and the
            # run do not share (a curve point added since the log was written) is skipped or
            # measured afresh without ending the replay of what was paid for.
            if row.purpose == "eval":
                self._replay_pos += 1
                continue
            if purpose == "eval":
                return None
            self._replay = []  # the run diverged from its log: measure from here on
            return None
        return None
