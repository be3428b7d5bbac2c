"""Non-idealities between a programmed setting and a measured output.

A small hierarchy in the manner of aihwkit: each class is one physical effect with its
meaning and unit. Simulators compose them in ``query``:

    theta  --DACQuantisation-->  --ProgrammingNoise-->  physics  --ReadNoise-->  y

Thermal drift and misalignment are not here: they change the physics itself and enter
each simulator's model (see the simulator docstrings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SettingNoise:
    """An effect on the control vector as the device applies it. ``apply`` maps
    ``theta (n_params,)`` to the applied setting ``(n_params,)``."""

    def apply(
        self, theta: np.ndarray, low: np.ndarray, high: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        raise NotImplementedError


@dataclass
class DACQuantisation(SettingNoise):
    """A ``bits``-bit DAC over each parameter's bound range: the applied value is the
    nearest of ``2**bits`` levels. Unit: levels over ``[low, high]``. ``bits=None`` is off."""

    bits: int | None = 12

    def apply(self, theta, low, high, rng):
        if self.bits is None:
            return theta
        span = high - low
        step = span / (2**self.bits - 1)
        return np.where(np.isfinite(step), low + np.round((theta - low) / step) * step, theta)


@dataclass
class ProgrammingNoise(SettingNoise):
    """Each programming event lands off target by ``N(0, std)`` in the parameter's own unit
    (rad for phase shifters, mA for heater currents, grey level for mask pixels). Redrawn at
    every query: it models settle error and DAC noise, not a fixed offset."""

    std: float = 0.0

    def apply(self, theta, low, high, rng):
        if self.std <= 0:
            return theta
        return theta + rng.normal(0.0, self.std, theta.shape)


@dataclass
class ReadNoise:
    """Additive Gaussian detector noise, ``std`` as a fraction of the device's full-scale
    output (``full_scale`` in output units). Redrawn for every sample of every query."""

    std: float = 0.01
    full_scale: float = 1.0

    def apply(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.std <= 0:
            return y
        return y + rng.normal(0.0, self.std * self.full_scale, y.shape)
