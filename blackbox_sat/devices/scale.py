"""A unit for parameters without bounds, measured on the device.

Trust radii, SAT's ``rho`` and every zeroth-order step are in normalized units: fractions
of a parameter's bound width (docs/design.md, "Units"). A parameter without bounds has no
width, so one is measured: **the perturbation of one parameter that would move the outputs by
their spread** across inputs, at ``theta0``.

Rule: outputs ``y0`` at ``theta0`` are measured twice (read noise, and the spread ``s``, the
RMS over outputs of their standard deviation across the inputs). All ``m`` unbounded
parameters are then moved together, ``theta0 + delta d`` with ``d`` a fixed random sign
pattern and ``delta`` from ``DELTA0 * (1 + max |theta0|)`` up by factors of 4, until the
output change ``D(delta)`` (RMS) passes ``max(FRACTION * s, 5 * noise)``: small enough to be
in the linear regime, far enough above the noise to be measured. One more setting at
``delta' = delta * target / D(delta)`` lands on the target. The scale is ``sqrt(m) * delta' *
s / D(delta')``: the linear extrapolation to a change of one spread, and ``sqrt(m)`` because
``m`` moves with random signs add up incoherently, so one parameter alone needs ``sqrt(m)``
times more. On the built-in simulators (every parameter treated as unbounded) this gives
0.34-0.96 of their bound widths (docs/experiments.md, "Devices without bounds"), so steps
on an unbounded device are, if anything, smaller than on a bounded one. The rule is linear
in the device's units: a copy of a device with its parameters rescaled by 1000 gets a scale
1000 times larger and the same normalized steps. ``--set scale=...`` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The output change the search aims at, as a fraction of the outputs' spread.
FRACTION = 0.1
#: First perturbation, relative to ``1 + max |theta0|``.
DELTA0 = 1e-6
#: Most growing perturbations tried (4**24 ~ 3e14 times DELTA0).
MAX_STEPS = 24


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


def measure_scale(
    query: Callable[[np.ndarray], np.ndarray],
    theta0: np.ndarray,
    free: np.ndarray,
    seed: int = 0,
) -> dict:
    """The measured scale of the parameters marked ``free (n_params,)`` (bool).

    ``query(theta) -> (B, out_dim)`` measures the device on fixed inputs. Returns ``scale``
    (device units; None if the outputs never moved above the noise), ``settings`` (calls
    made), ``spread``, ``noise`` and ``change`` (the output change at the last probe)."""
    theta0 = np.asarray(theta0, float)
    y0, y1 = query(theta0), query(theta0)
    noise = _rms(y1 - y0) / np.sqrt(2)
    y0 = (y0 + y1) / 2
    spread = _rms(np.std(y0, axis=0))
    target = max(FRACTION * spread, 5 * noise)
    d = np.where(free, np.random.default_rng([seed, 0x5CA1E]).choice([-1.0, 1.0], len(theta0)), 0)
    delta = DELTA0 * (1 + float(np.max(np.abs(theta0))))
    calls, change = 2, 0.0
    for _ in range(MAX_STEPS):
        change = _rms(query(theta0 + delta * d) - y0)
        calls += 1
        if change >= target:
            delta = delta * target / change
            change = _rms(query(theta0 + delta * d) - y0)
            calls += 1
            break
        delta *= 4
    else:
        return {
            "scale": None,
            "settings": calls,
            "spread": spread,
            "noise": noise,
            "change": change,
        }
    return {
        "scale": float(np.sqrt(np.sum(free))) * delta * spread / max(change, 1e-300),
        "settings": calls,
        "spread": spread,
        "noise": noise,
        "change": change,
    }
