"""Which step type a pipeline round uses: the loop measures its own surrogate.

Every round ends with the check loss measured at its end point (the accept test), so the
decrease it achieved, ``measured = L(start) - L(end)``, is known. The surrogate predicts the
same decrease without a setting: the check minibatch's measured outputs at the start plus
the surrogate's predicted change, ``predicted = L(start) - L(y_start + f(end) - f(start))``.
This is the comparison behind the trust-region ratio test (Conn, Gould and Toint,
"Trust-region methods", 2000), read as a forecast's skill.

**Rule.** Over the last ``window`` (4) surrogate rounds, with ``E = sum (measured -
predicted)^2`` the surrogate's prediction error and ``Z = sum measured^2`` the error of
predicting no change, the surrogate *fails* when

    E > Z    and    E > 2 tol^2 * chi2_95(window),

that is, its skill score ``1 - E / Z`` (as for forecasts) is negative, so its predicted
changes are worse than none, and its errors are significantly larger than noise: for a
perfect surrogate, ``measured - predicted`` is the noise of a difference of two check
losses, variance ``2 tol^2`` (``tol`` the check loss's measured spread), so ``E / (2 tol^2)``
is chi-squared with ``window`` degrees of freedom and exceeds its 95th percentile (9.5 for
4 rounds) one time in twenty. The *sign* of the progress is
not the test: a good surrogate also predicts the rounds that make the loss rise (on ``mrr``
about every other round is rejected as a matter of course, and was predicted). While it
fails, rounds go to the fallback (harmonic coordinate steps when every parameter is
periodic, guided-ES steps otherwise), and every ``retry``-th round (4) is a surrogate round
again, so its record stays current; when it predicts well, every round is a surrogate
round. Measured
records per device: docs/experiments.md, "A loop that measures its own surrogate".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2

STEP_TYPES = ("surrogate", "guided", "harmonic")


@dataclass
class SurrogateMonitor:
    """Predicted against measured decreases of the surrogate's rounds, and the next round's
    step type. ``fixed`` forces one step type (``"auto"``: the rule above)."""

    fallback: str = "guided"
    fixed: str = "auto"
    window: int = 4
    retry: int = 4
    record: list = field(default_factory=list)  # (predicted, measured) of surrogate rounds
    rounds_since_surrogate: int = 0

    def observe(self, kind: str, predicted: float, measured: float) -> None:
        """Record a finished round of step type ``kind`` (decreases in nats)."""
        if kind == "surrogate":
            self.record.append((float(predicted), float(measured)))
            self.rounds_since_surrogate = 0
        else:
            self.rounds_since_surrogate += 1

    def failing(self, tol: float) -> bool:
        """Whether the last ``window`` surrogate rounds' predictions were worse than none."""
        if len(self.record) < self.window:
            return False
        pred, meas = np.asarray(self.record[-self.window :]).T
        err, zero = float(np.sum((meas - pred) ** 2)), float(np.sum(meas**2))
        return err > zero and err > 2 * tol**2 * float(chi2.ppf(0.95, self.window))

    def next_kind(self, tol: float) -> str:
        """The step type of the next round."""
        if self.fixed != "auto":
            return self.fixed
        if not self.failing(tol) or self.rounds_since_surrogate + 1 >= self.retry:
            return "surrogate"
        return self.fallback
