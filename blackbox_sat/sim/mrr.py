"""``mrr``: a microring weight bank in the broadcast-and-weight architecture (silicon).

Physics (docs/protocol.md, "The built-in simulators")
---------------------------------
- **Signal path.** ``in_dim`` inputs ride on separate WDM wavelengths ``lambda_i`` and are
  broadcast to ``out_dim`` buses. Bus ``j`` carries one add-drop ring per input; ring
  ``(j, i)`` is tuned by its heater current ``I_ij`` (mA). The drop and through ports of a bus
  land on a balanced photodiode pair (Tait et al., J. Lightwave Technol. 32, 4029 (2014)).
- **Weight.** Drop transmission is a Lorentzian in detuning ``d = lambda_i - lambda_res``:
  ``D = 1 / (1 + u^2)``, ``u = 2 d / FWHM``; through ``T = 1 - D`` (lossless ring); balanced
  detection gives ``w = D - T = (1 - u^2) / (1 + u^2)`` in [-1, 1] (1 on resonance).
- **Output.** Inputs are optical powers, ``input_bounds = [0, 1]``. ``y_j = sum_i w_ij x_i``
  in units of one unit-power channel; ``full_scale = in_dim`` (every input at 1, every ring on
  resonance). Channel spacing is taken as large against the FWHM, so a ring's filtering of the
  other wavelengths is neglected (about 1 % at 0.8 nm spacing).
- **Resonance.** ``lambda_res = lambda_i - DETUNE0 + offset_ij + eta * P_eff_ij + 0.08 * drift``
  (nm). Heating red-shifts the ring (silicon's dn/dT > 0), so with ``I`` rising from 0 the ring
  sweeps from ``+2 FWHM`` (``w = -0.88``) through resonance (``w = 1``, at ``0.69 I_max``) to
  ``-2.2 FWHM`` (``w = -0.90``): more than one FWHM on each side. ``P = R I^2``.

Defaults (datasheet; sources)
-----------------------------
- ``FWHM = 0.15`` nm: loaded Q ~ 1.0e4 at 1550 nm, mid-range of the usual 100-200 pm;
  weight-bank chips of this kind: Tait et al., Sci. Rep. 7, 7430 (2017).
- ``DETUNE0 = 2 FWHM = 0.30`` nm: the cold ring sits blue of its channel by design.
- ``R = 1`` kOhm heater (so ``P`` [mW] = ``R`` [kOhm] ``I^2`` [mA^2]), ``ETA = 0.1`` nm/mW, a
  typical metal-heater tuning efficiency on SOI rings (0.1-0.3 nm/mW; doped-Si heaters reach the
  upper end), ``I_MAX = 2.5`` mA: 6.25 mW and 0.625 nm (4.2 FWHM) of tuning.
- **Drift** ``drift`` (K) moves every resonance by ``THERMAL_SHIFT = 0.080`` nm/K, the paper's
  value (83 pm/K is the measured single-ring limit in Shi et al., Open Phys. 21, 20230138
  (2023)). It moves resonances against the fixed laser grid, so it is not cancelled by the
  balanced readout: 1 K is 0.53 FWHM, and moves the nominal weights at ``theta0`` by 0.6-0.9
  on average (unprotected training collapses, as in the paper). The shift is common-mode by
  default (every ring moves by the same 80 pm/K, the paper's setting); ``drift_spread`` (default
  0) gives each ring its own coefficient ``THERMAL_SHIFT * (1 + drift_spread * z)`` (own arm
  length and heat sinking, as ``mzi``'s ``beta_spread``), drawn after the fabrication draws so a
  chip's errors do not change with it. Either way 1 K is a coherent move of all 160 rings, an
  L2 step of 1.26 in normalized currents at ``theta0``, 25x SAT's default radius of 0.05
  (docs/experiments.md, "mrr drift against the paper").
- **Thermal crosstalk** (``crosstalk`` = ``kappa``, default 0.05): ring ``i`` on a bus feels
  ``kappa^|i-k|`` of heater ``k``'s power on the same bus (geometric decay with ring index),
  ``P_eff = P @ C^T``. A few percent for rings tens of um apart without trenches (Teofilovic et
  al., arXiv:2404.10589; Tait lab review, Nanophotonics 11, 2022 (arXiv:2203.01792)).
- **Fabrication** (``sigma``, default 0.2; standard normals drawn once from ``chip_rng`` in the
  order offset, heater, linewidth, then scaled):
  - ``offset_ij = sigma * FWHM * z``: residual resonance offset, ``sigma`` is its std in FWHM
    (0.2 FWHM = 30 pm: a few tenths of a FWHM);
  - heater power efficiency ``exp(sigma / 4 * z)`` (5 % at the default: resistance and heater
    placement spread);
  - linewidth ``FWHM * exp(sigma / 4 * z)`` (5 %: coupling-gap spread).
  The Lorentzian is steep: at the default a ring's weight at ``theta0`` is off its datasheet
  value by ~0.3 on average from the offsets alone (~0.45 with crosstalk), so weights trained
  on another chip (or the datasheet) transfer poorly; drift is the headline perturbation.
- **Query noise** (applied by :meth:`SimulatedDevice.query`): 12-bit DAC over [0, I_MAX]
  (0.61 uA steps); programming noise 0.002 mA (2 uA rms, ~0.1 % of range: current-source settle
  error), the applied current is then clipped to the bounds; read noise 0.003 of full scale,
  the ~6.6-effective-bit ADC figure also used by ``mzi``.

Views: ``nominal_model()`` is the datasheet: no offsets, nominal heaters and linewidth, no
drift, and the design's crosstalk (set by the ring pitch, the same on every chip of a
design, as in ``mzi``). With ``sigma = 0`` and ``drift = 0`` the true model equals it.

Controls: ``theta[j * in_dim + i] = I_ij`` (mA), row-major over (output bus, input), bounds
[0, I_MAX]. ``theta0``: a fixed, chip-independent nominal weight pattern
``w0 ~ U(-0.25, 0.25)`` (like a network's random init; own RNG stream, not the chip seed)
realised on the blue branch of each isolated *nominal* ring (crosstalk neglected). It sits on the steep flank (maximum
response) and gives the readout gain a non-degenerate output spread; the bounds' midpoint
would put every nominal weight at -0.57.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SimulatedDevice
from .calibration import CalibrationModelBase

FWHM = 0.15  # nm
DETUNE0 = 2 * FWHM  # nm, cold detuning of every ring (channel minus resonance)
HEATER_R = 1.0  # kOhm
ETA = 0.1  # nm/mW
I_MAX = 2.5  # mA
THERMAL_SHIFT = 0.080  # nm/K
CROSSTALK = 0.05  # unitless, nearest-neighbour heater fraction
SIGMA = 0.2  # resonance-offset std, in FWHM
SPREAD_PER_SIGMA = 0.25  # heater-efficiency and linewidth log-std per unit sigma
READ_NOISE = 0.003  # fraction of full scale
PROGRAMMING_NOISE = 0.002  # mA
THETA0_PATTERN_SEED = 20260  # seed of the fixed starting-weight pattern (not the chip seed)
START_AMPLITUDE = 0.25  # starting weights are U(-START_AMPLITUDE, START_AMPLITUDE)


def start_weights(out_dim: int, in_dim: int) -> np.ndarray:
    """The fixed starting weight pattern ``(out_dim, in_dim)``, ``U(-a, a)`` with
    ``a = START_AMPLITUDE``; it depends only on the shape, so every chip (and ``freespace``)
    starts from the same nominal weights."""
    rng = np.random.default_rng([THETA0_PATTERN_SEED, out_dim, in_dim])
    return rng.uniform(-START_AMPLITUDE, START_AMPLITUDE, (out_dim, in_dim))


def crosstalk_matrix(in_dim: int, kappa: float) -> np.ndarray:
    """``C (in_dim, in_dim)`` with ``C[i, k] = kappa^|i-k|`` (1 on the diagonal)."""
    dist = np.abs(np.subtract.outer(np.arange(in_dim), np.arange(in_dim)))
    return np.eye(in_dim) if kappa == 0 else float(kappa) ** dist


class RingBankModel(torch.nn.Module):
    """``model(theta (out*in,), x (batch, in)) -> (batch, out)``, differentiable in both,
    computed in ``theta``'s dtype. Buffers (float64): ``detune (out, in)`` nm at zero heat,
    ``efficiency (out, in)`` nm/mA^2 from a ring's own heater, ``fwhm (out, in)`` nm,
    ``coupling (in, in)`` heat-crosstalk matrix along a bus."""

    detune: torch.Tensor
    efficiency: torch.Tensor
    fwhm: torch.Tensor
    coupling: torch.Tensor

    def __init__(
        self, detune: np.ndarray, efficiency: np.ndarray, fwhm: np.ndarray, coupling: np.ndarray
    ):
        super().__init__()
        self.out_dim, self.in_dim = detune.shape
        for name, arr in (
            ("detune", detune),
            ("efficiency", efficiency),
            ("fwhm", fwhm),
            ("coupling", coupling),
        ):
            self.register_buffer(name, torch.as_tensor(np.asarray(arr, float)))

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        """Heater currents ``(n_params,)`` mA -> signed weights ``(out, in)`` in [-1, 1]."""
        dt = theta.dtype
        current = theta.reshape(self.out_dim, self.in_dim)
        shift = (self.efficiency.to(dt) * current * current) @ self.coupling.to(dt).T  # nm
        u = 2 * (self.detune.to(dt) - shift) / self.fwhm.to(dt)
        u2 = u * u
        return (1 - u2) / (1 + u2)

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.to(theta.dtype) @ self.weights(theta).T


class RingCalibrationModel(CalibrationModelBase):
    """Microring weight bank with unknown per-ring offsets, heater gains, linewidths (``mrr``).

    Parameters, each ``(out_dim, in_dim)``: ``offset`` nm (resonance red-shift from the
    datasheet; datasheet 0, scale ``sigma * FWHM``), ``log_heater`` (log heater-efficiency
    gain; 0, ``sigma / 4``), ``log_width`` (log linewidth / FWHM; 0, ``sigma / 4``). Fixed:
    ``DETUNE0``, ``ETA * R``, ``FWHM`` and the crosstalk matrix."""

    offset: torch.Tensor
    log_heater: torch.Tensor
    log_width: torch.Tensor
    coupling: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        kappa: float,
        sigma: float = 0.2,
        spread_per_sigma: float = 0.25,
    ):
        super().__init__()
        self.out_dim, self.in_dim = int(out_dim), int(in_dim)
        shape = (self.out_dim, self.in_dim)
        self._add("offset", np.zeros(shape), sigma * FWHM)
        self._add("log_heater", np.zeros(shape), sigma * spread_per_sigma)
        self._add("log_width", np.zeros(shape), sigma * spread_per_sigma)
        self.register_buffer("coupling", torch.as_tensor(crosstalk_matrix(self.in_dim, kappa)))

    def weights(self, thetas: torch.Tensor) -> torch.Tensor:
        """``(S, out, in)`` signed weights for currents ``thetas (S, n_params)`` mA."""
        dt = thetas.dtype
        current = thetas.reshape(-1, self.out_dim, self.in_dim)
        eff = ETA * HEATER_R * torch.exp(self.log_heater.to(dt))
        shift = (eff * current * current) @ self.coupling.to(dt).T
        u = 2 * (DETUNE0 - self.offset.to(dt) - shift) / (FWHM * torch.exp(self.log_width.to(dt)))
        u2 = u * u
        return (1 - u2) / (1 + u2)

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.to(thetas.dtype), self.weights(thetas).transpose(1, 2))


class MRRWeightBank(SimulatedDevice):
    """One weight-bank chip; physics, units and sources in the module docstring.

    Chip draws (rescaled by sigma): ``resonance_offset (out, in)`` nm, ``heater_gain (out, in)``
    and ``linewidth (out, in)`` nm."""

    input_bounds = (0.0, 1.0)

    def __init__(
        self,
        seed: int = 0,
        sigma: float = SIGMA,
        noise: float = READ_NOISE,
        in_dim: int = 16,
        out_dim: int = 10,
        drift: float = 0.0,
        crosstalk: float = CROSSTALK,
        programming_noise: float = PROGRAMMING_NOISE,
        dac_bits: int | None = 12,
        drift_spread: float = 0.0,
    ):
        if int(in_dim) < 1 or int(out_dim) < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.full_scale = float(self.in_dim)  # read by SimulatedDevice.__init__ for ReadNoise
        super().__init__(
            seed=seed,
            noise=noise,
            programming_noise=programming_noise,
            dac_bits=dac_bits,
            sigma=sigma,
            in_dim=in_dim,
            out_dim=out_dim,
            drift=drift,
            crosstalk=crosstalk,
            drift_spread=drift_spread,
        )
        shape = (self.out_dim, self.in_dim)
        self.n_params = self.out_dim * self.in_dim
        self.bounds = (np.zeros(self.n_params), np.full(self.n_params, I_MAX))
        self.sigma, self.drift, self.crosstalk = float(sigma), float(drift), float(crosstalk)
        # Fixed draw order, independent of sigma and of drift/crosstalk.
        z_offset = self.chip_rng.standard_normal(shape)
        z_heater = self.chip_rng.standard_normal(shape)
        z_width = self.chip_rng.standard_normal(shape)
        self.resonance_offset = self.sigma * FWHM * z_offset
        self.heater_gain = np.exp(self.sigma * SPREAD_PER_SIGMA * z_heater)
        self.linewidth = FWHM * np.exp(self.sigma * SPREAD_PER_SIGMA * z_width)
        # Drawn last (and only when asked), so the draws above do not depend on it.
        z_drift = self.chip_rng.standard_normal(shape) if drift_spread else np.zeros(shape)
        self.thermal_shift = THERMAL_SHIFT * (1 + float(drift_spread) * z_drift)  # nm/K per ring
        self.theta0 = self.currents_for(start_weights(self.out_dim, self.in_dim))

    @staticmethod
    def currents_for(weights: np.ndarray) -> np.ndarray:
        """Nominal (datasheet) heater currents ``(n_params,)`` mA that realise ``weights
        (out, in)`` in (-0.88, 1] on the blue branch (below the resonance crossing)."""
        w = np.clip(np.asarray(weights, float), -0.88, 1.0)
        detune = FWHM / 2 * np.sqrt((1 - w) / (1 + w))  # nm, blue side (d >= 0)
        power = (DETUNE0 - detune) / ETA  # mW
        return np.sqrt(np.maximum(power, 0.0) / HEATER_R).ravel()

    def _build_model(self, nominal: bool) -> torch.nn.Module:
        shape = (self.out_dim, self.in_dim)
        if nominal:
            return RingBankModel(
                np.full(shape, DETUNE0),
                np.full(shape, ETA * HEATER_R),
                np.full(shape, FWHM),
                crosstalk_matrix(self.in_dim, self.crosstalk),
            )
        detune = DETUNE0 - self.resonance_offset - self.thermal_shift * self.drift
        return RingBankModel(
            detune,
            ETA * HEATER_R * self.heater_gain,
            self.linewidth,
            crosstalk_matrix(self.in_dim, self.crosstalk),
        )

    def calibration_model(self) -> torch.nn.Module:
        """Grey-box model for calibration (:class:`~.calibration.RingCalibrationModel`): known
        datasheet ring design and crosstalk, unknown per-ring resonance offset, heater gain and
        linewidth at their datasheet values; prior scales from ``sigma`` (0.2 where it is 0)."""
        return RingCalibrationModel(
            self.out_dim,
            self.in_dim,
            self.crosstalk,
            sigma=self.sigma or SIGMA,
            spread_per_sigma=SPREAD_PER_SIGMA,
        )

    def calibration_truth(self) -> dict[str, torch.Tensor]:
        """This chip's values of :meth:`calibration_model`'s parameters (drift included in the
        offsets): loaded with ``model.load_truth``, the model equals :meth:`true_model`."""
        f64 = torch.float64
        return {
            "offset": torch.as_tensor(
                self.resonance_offset + self.thermal_shift * self.drift, dtype=f64
            ),
            "log_heater": torch.as_tensor(np.log(self.heater_gain), dtype=f64),
            "log_width": torch.as_tensor(np.log(self.linewidth / FWHM), dtype=f64),
        }

    def applied_setting(self, theta: np.ndarray) -> np.ndarray:
        """DAC, programming noise, then the current source's range [0, I_MAX]."""
        return np.clip(super().applied_setting(theta), 0.0, I_MAX)

    def weights(self, theta: np.ndarray, nominal: bool = False) -> np.ndarray:
        """Signed weights ``(out_dim, in_dim)`` of this chip (or the datasheet) at ``theta``."""
        model = self.nominal_model() if nominal else self.true_model()
        assert isinstance(model, RingBankModel)
        with torch.no_grad():
            return model.weights(torch.as_tensor(np.asarray(theta, float))).numpy()


def mrr(
    seed: int = 0,
    sigma: float = SIGMA,
    noise: float = READ_NOISE,
    in_dim: int = 16,
    out_dim: int = 10,
    drift: float = 0.0,
    crosstalk: float = CROSSTALK,
    programming_noise: float = PROGRAMMING_NOISE,
    dac_bits: int | None = 12,
    drift_spread: float = 0.0,
    **kw,
) -> MRRWeightBank:
    """A weight-bank chip. ``sigma``: resonance-offset std in FWHM (heater and linewidth spreads
    ``sigma/4``). ``noise``: read noise std, fraction of full scale (``in_dim``). ``drift``: K.
    ``crosstalk``: neighbour heater fraction. ``programming_noise``: mA rms per query.
    ``dac_bits``: None for off. ``drift_spread``: relative per-ring spread of the thermal
    shift (0: common-mode drift)."""
    return MRRWeightBank(
        seed=seed,
        sigma=sigma,
        noise=noise,
        in_dim=in_dim,
        out_dim=out_dim,
        drift=drift,
        crosstalk=crosstalk,
        programming_noise=programming_noise,
        dac_bits=dac_bits,
        drift_spread=drift_spread,
        **kw,
    )
