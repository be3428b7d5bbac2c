"""Shared shape of the built-in simulators.

Each simulator is one chip, fixed by ``seed``, with three views of it:

- ``nominal_model()``: the datasheet, no fabrication errors, no perturbation;
- ``true_model()``: this chip's exact physics (errors, drift or misalignment), noise-free;
- ``query(theta, x)``: the contract call: ``true_model`` behind DAC quantisation,
  programming noise and read noise, in numpy.

The two model views are torch modules ``model(theta, x) -> y`` with ``theta (n_params,)``
and ``x (batch, in_dim)`` giving ``(batch, out_dim)``, differentiable in both, computed in
the dtype of ``theta``. They exist for model-based methods and for measuring surrogates;
black-box methods never see them.
"""

from __future__ import annotations

import numpy as np
import torch

from .noise import DACQuantisation, ProgrammingNoise, ReadNoise


class SimulatedDevice:
    """Base for ``mzi``, ``mrr``, ``freespace``. Subclasses set the contract members and
    implement ``_build_model(nominal: bool) -> torch.nn.Module``."""

    n_params: int
    in_dim: int
    out_dim: int
    bounds: tuple[np.ndarray, np.ndarray]
    periodic: bool | np.ndarray = False
    input_bounds: tuple = (-1.0, 1.0)
    max_batch: int | None = None
    #: Full-scale output, in output units: the unit of ``noise`` (read noise std).
    full_scale: float = 1.0

    def __init__(
        self,
        seed: int = 0,
        noise: float = 0.01,
        programming_noise: float = 0.0,
        dac_bits: int | None = 12,
        **config,
    ):
        #: Every constructor keyword, so that :meth:`sibling` can rebuild this chip's kind.
        self.config = dict(
            config, seed=seed, noise=noise, programming_noise=programming_noise, dac_bits=dac_bits
        )
        self.seed = int(seed)
        self.chip_rng = np.random.default_rng([self.seed, 0])  # fabrication draws
        self._query_rng = np.random.default_rng([self.seed, 1])  # per-query noise
        self.dac = DACQuantisation(dac_bits)
        self.programming = ProgrammingNoise(programming_noise)
        self.read = ReadNoise(noise, self.full_scale)
        self._models: dict[bool, torch.nn.Module] = {}

    def sibling(self, **overrides) -> SimulatedDevice:
        """Another instance of the same kind, e.g. ``sibling(seed=101)`` for an unseen chip of
        the same error level or ``sibling(drift=1.0)`` for this chip after drift."""
        return type(self)(**{**self.config, **overrides})

    # -- the two differentiable views ---------------------------------------------------
    def _build_model(self, nominal: bool) -> torch.nn.Module:
        raise NotImplementedError

    def nominal_model(self) -> torch.nn.Module:
        """The datasheet model: no fabrication error, no drift or misalignment."""
        if True not in self._models:
            self._models[True] = self._build_model(nominal=True)
        return self._models[True]

    def true_model(self) -> torch.nn.Module:
        """This chip's exact, noise-free physics."""
        if False not in self._models:
            self._models[False] = self._build_model(nominal=False)
        return self._models[False]

    # -- the contract call ----------------------------------------------------------------
    def applied_setting(self, theta: np.ndarray) -> np.ndarray:
        """The setting the hardware really applies: quantised, then programming noise."""
        low, high = (np.broadcast_to(np.asarray(b, float), (self.n_params,)) for b in self.bounds)
        applied = self.dac.apply(np.asarray(theta, float), low, high, self._query_rng)
        return self.programming.apply(applied, low, high, self._query_rng)

    def query(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Program ``theta (n_params,)``, measure ``x (batch, in_dim)``; ``(batch, out_dim)``."""
        applied = self.applied_setting(theta)
        with torch.no_grad():
            y = self.true_model()(
                torch.as_tensor(applied, dtype=torch.float64),
                torch.as_tensor(np.asarray(x, float), dtype=torch.float64),
            ).numpy()
        return self.read.apply(y, self._query_rng)
