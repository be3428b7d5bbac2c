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
about every other round is rejected as a matter of course, and was predicted). The fallback (harmonic coordinate steps when every
parameter is periodic, guided-ES steps otherwise) is tried once, when the surrogate first
fails that rule, and from then on each round goes to the *preferred* type, and the other one is retried after
``retry`` (4) rounds, then after twice as many for each retry since the preference last
changed (at most 32), so that both records stay current at a falling cost. The preferred type is the fallback when its measured decrease per setting over
its last two rounds leads the surrogate's over its last two by more than two standard
deviations of that comparison's noise, the surrogate when the fallback trails it by more
than one or made no progress at all, and otherwise the fallback only if the surrogate fails the skill rule above (the
settings of a round include the probes before it; a rejected round counts as no decrease;
the first round, from ``theta0``, is left out). So a surrogate that predicts well but moves
slowly (a mesh whose phases it only learns locally) still loses the budget to a faster
step. Measured
records per device: docs/experiments.md, "A loop that measures its own surrogate".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chi2

STEP_TYPES = ("surrogate", "guided", "harmonic")


@dataclass
class SurrogateMonitor:
    """Predicted against measured decreases of the surrogate's rounds, every round's measured
    decrease per setting, and the next round's step type. ``fixed`` forces one step type
    (``"auto"``: the rule above)."""

    fallback: str = "guided"
    fixed: str = "auto"
    window: int = 4
    retry: int = 4
    record: list = field(default_factory=list)  # (predicted, measured) of surrogate rounds
    rounds: list = field(default_factory=list)  # (kind, measured decrease, settings) of all
    best: str = "surrogate"  # the preferred type at the last decision
    backoff: int = 0  # retries of the other type since the preference last changed

    def observe(
        self,
        kind: str,
        predicted: float,
        measured: float,
        settings: int = 1,
        accepted: bool = True,
    ) -> None:
        """Record a finished round of step type ``kind``: predicted and measured decreases
        (nats), the settings it spent (its probes included), and whether it was accepted
        (a rejected round achieved nothing for its settings)."""
        if kind == "surrogate":
            self.record.append((float(predicted), float(measured)))
        achieved = float(measured) if accepted else 0.0
        self.rounds.append((kind, achieved, max(int(settings), 1)))

    def failing(self, tol: float) -> bool:
        """Whether the last ``window`` surrogate rounds' predictions were worse than none."""
        if len(self.record) < self.window:
            return False
        pred, meas = np.asarray(self.record[-self.window :]).T
        err, zero = float(np.sum((meas - pred) ** 2)), float(np.sum(meas**2))
        return err > zero and err > 2 * tol**2 * float(chi2.ppf(0.95, self.window))

    def rate(self, kind: str, last: int = 2) -> tuple[float, int] | None:
        """Measured decrease per setting over the last ``last`` rounds of ``kind``, and the
        settings they spent."""
        # the first round starts at theta0, where any step gains most: not comparable
        mine = [(m, n) for k, m, n in self.rounds[1:] if k == kind][-last:]
        if not mine:
            return None
        spent = sum(n for _, n in mine)
        return sum(m for m, _ in mine) / spent, spent

    def preferred(self, tol: float) -> str:
        """The step type the record favours (module docstring)."""
        own, other = self.rate("surrogate"), self.rate(self.fallback)
        lead = None
        if own is not None and other is not None:
            # the fallback's lead over the surrogate's last rounds' settings, in standard
            # deviations of its noise (each side sums two decreases of variance 2 tol^2)
            lead = (other[0] - own[0]) * own[1] / (np.sqrt(8) * tol + 1e-12)
            if lead > 2:
                return self.fallback  # clearly faster
            if lead < -1 or other[0] <= 0:
                # measurably slower, or no progress at all: a failing forecast alone does not
                # hand the budget to a fallback that achieved nothing (on mrr the surrogate
                # fails the skill test while every guided round was rejected, and the loop
                # lost 2-4 points to them: docs/experiments.md, "A loop that measures its own
                # surrogate")
                return "surrogate"
        return self.fallback if self.failing(tol) else "surrogate"

    def next_kind(self, tol: float) -> str:
        """The step type of the next round."""
        if self.fixed != "auto":
            return self.fixed
        kinds = [k for k, _, _ in self.rounds]
        if not kinds:
            return "surrogate"
        if self.fallback not in kinds:
            # measure the fallback once, when the surrogate first fails the skill test: tried
            # unconditionally in round 2, it cost mrr 4-6 points at a budget of 1000
            return self.fallback if self.failing(tol) else "surrogate"
        best = self.preferred(tol)
        if best != self.best:
            self.best, self.backoff = best, 0
        run = 0
        for k in reversed(kinds):
            if k != best:
                break
            run += 1
        # the other type is retried after retry rounds, then after twice as many for each
        # retry since the preference last changed (at most 8 x retry)
        if run + 1 >= self.retry * 2 ** min(self.backoff, 3):
            self.backoff += 1
            return self.fallback if best == "surrogate" else "surrogate"
        return best
