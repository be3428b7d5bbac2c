"""The pipeline's trust region: its radius, the accept test's tolerance, and the test itself.

A round's end point is accepted unless its check loss is worse than the start's by more
than ``tol``, the measured spread of the check loss (``accept_tol="auto"``): a plain "not
worse" test throws away improving rounds half the time once the per-round gain is below
the noise. Accepted rounds re-centre the box and grow it by ``grow``; rejected ones return
to the start and shrink it by ``shrink``, within ``[radius_min, radius_max]``. Radii are
L-infinity, in normalized units (bound widths). Numbers: docs/experiments.md, "Accept test
tolerance" and "Trust-region floor".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrustRegion:
    """Radius, tolerance and the current centre's check loss; :meth:`judge` is the test."""

    radius: float
    radius_min: float
    radius_max: float
    grow: float
    shrink: float
    tol: float = 0.0
    check_loss: float = np.inf
    check_std: float = 0.0
    accepted: int = 0
    rejected_run: int = 0  # rejections in a row, for refresh_after

    @classmethod
    def from_config(cls, cfg) -> TrustRegion:
        """The region a :class:`~.pipeline.PipelineConfig` describes, before any measurement."""
        return cls(cfg.radius, cfg.radius_min, cfg.radius_max, cfg.grow, cfg.shrink)

    def calibrate(self, repeats: list[float], accept_tol: str | float = "auto") -> None:
        """Set the centre's check loss from repeated measurements at the start, and the
        tolerance: their spread (``"auto"``) or a number of nats."""
        self.check_loss = float(np.mean(repeats))
        self.check_std = float(np.std(repeats, ddof=1)) if len(repeats) > 1 else 0.0
        self.tol = self.check_std if accept_tol == "auto" else float(accept_tol)

    def box(self, center_u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The L-infinity box ``(lo, hi)`` of the current radius around ``center_u`` (normalized)."""
        return center_u - self.radius, center_u + self.radius

    def judge(self, end_loss: float, resize: bool = True) -> bool:
        """The accept test for a move whose check loss is ``end_loss``; updates the centre's
        check loss when accepted and, if ``resize``, the radius. Returns whether it was
        accepted. Only the surrogate's own rounds resize: the radius is where the surrogate
        is trusted, so a fallback step's failure says nothing about it."""
        if end_loss <= self.check_loss + self.tol:
            self.accepted = self.accepted + 1
            self.check_loss = end_loss
            if resize:
                self.rejected_run = 0
                self.radius = min(self.radius * self.grow, self.radius_max)
            return True
        if resize:
            self.rejected_run += 1
            self.radius = max(self.radius * self.shrink, self.radius_min)
        return False
