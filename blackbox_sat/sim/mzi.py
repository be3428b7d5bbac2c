"""``mzi``: a programmable Clements interferometer mesh of N modes (silicon photonics).

Physics (docs/protocol.md, "The built-in simulators")
---------------------------------
- **Mesh.** Rectangular Clements layout (Clements et al., Optica 3, 1460 (2016)): N columns;
  column ``c`` holds MZIs on the mode pairs ``(m, m+1)`` with ``m = c % 2, c % 2 + 2, ...``,
  N(N-1)/2 MZIs in all. The output phase screen of a universal mesh is left out: the
  photodiodes read intensities, which it cannot change.
- **MZI.** ``T = DC(e2) · P(theta) · DC(e1) · P(phi)`` with ``P(a) = diag(exp(i·a), 1)`` on
  the upper arm (light meets ``phi`` first) and ``DC(e) = [[t, i·k], [i·k, t]]``,
  ``t = sqrt((1+e)/2)``, ``k = sqrt((1-e)/2)``. Every ``DC`` is unitary, so the mesh is
  lossless and unitary for any error. With ideal couplers ``theta = 0`` is the cross
  state, ``pi`` the bar state, ``pi/2`` a 50:50 split.
- **Coupler error** ``e ~ N(0, sigma)``, unitless, one per coupler (two per MZI), clipped to
  (-1, 1). This is the splitting-ratio convention of neurophox (Pai et al., Phys. Rev.
  Applied 11, 064044 (2019)); the paper's sigma = 0.15 is in these units.
- **Phase error**: a fixed ``N(0, sigma_phase)`` rad offset per shifter (default
  ``sigma_phase = sigma``, i.e. 0.15 rad as in docs/protocol.md).
- **Thermal crosstalk**: applied = ``C · programmed``, ``C = I + kappa`` on the heaters that
  are neighbours in the same column (internal with internal, external with external).
  ``kappa = 0.02`` (unitless), inside the usual 0.01-0.05 range for heaters at a
  two-waveguide pitch without isolation trenches. The programmed phase is wrapped to
  [0, 2pi) first, since a heater's power (and so its leakage) is set by the wrapped value;
  the model is therefore exactly 2pi-periodic, with a jump of ``2pi·kappa`` on the
  neighbours where a phase wraps.
- **Drift** ``dT`` (K, keyword ``drift``) adds ``beta_j · dT`` to shifter ``j``, with
  ``beta_j = beta · (1 + N(0, 0.1))``. ``beta = 2pi/lambda · dn/dT · L`` with
  lambda = 1.55 um, dn/dT = 1.8e-4 /K for silicon at room temperature near 1550 nm (Komma et
  al., Appl. Phys. Lett. 101, 041905 (2012)) and L = 200 um, a typical metal-heater
  phase-shifter length in SOI (Liu et al., Front. Optoelectron. 15, 9 (2022), a review):
  ``beta ~= 0.146 rad/K``. Treating the heated section as unmatched by the other arm is the
  worst case of the benchmark protocol. It is not common-mode: it moves every internal phase
  (the splitting ratios) and every external phase on one arm only.
- **Detection.** ``x`` is a real amplitude vector in [-1, 1]^N, normalised per sample to
  unit power (``x / sqrt(|x|^2 + 1e-12)``, so the all-zero input gives zero output).
  Output: intensities ``|U x|^2`` on N photodiodes, summing to 1; ``full_scale = 1``
  (all the light on one detector).
- **Detector saturation** (keyword ``saturation``, off by default): the true model reads
  ``P / (1 + P / saturation)`` instead of the power ``P`` (a photodiode/TIA compressing
  near ``saturation`` of full scale). Neither the datasheet nor :meth:`MZIMesh.calibration_model`
  has it: a model-form error for testing calibration (``calibration_truth()`` then no
  longer reproduces ``true_model()``).
- **Unequal arm loss** (keyword ``arm_loss``, dB per phase shifter, default 0: off): the
  shifter arm of every MZI (both ``theta`` and ``phi``) transmits ``10^(-arm_loss / 20)``
  of the field and the other arm nothing less (heater absorption, doped-waveguide loss),
  so the mesh is lossy and the interference's extinction is limited. A model-form error
  like ``saturation``, absent from the datasheet and the calibration model.
- **Query noise** (in :mod:`.noise`, applied by :meth:`SimulatedDevice.query`): 12-bit DAC
  over [0, 2pi] (1.5 mrad steps); programming noise 0.005 rad per shifter per query
 ; read noise 0.003 of full scale. 0.003 is the std of an ideal ADC of
  about 6.6 effective bits over full scale (2^-6.6 / sqrt(12)), a modest figure for a
  fast photodiode + TIA readout, and about 5 % of the mean output at N = 16.

Views: ``nominal_model()`` is the datasheet: ideal couplers, no phase offsets, no drift,
and the design's crosstalk ``kappa`` (set by the heater pitch, the same on every chip of
a design, so a datasheet states it). ``true_model()`` has everything. With ``sigma = 0``
and ``drift = 0`` the two coincide.

Controls: ``theta = [theta_0 .. theta_{M-1}, phi_0 .. phi_{M-1}]``, M = N(N-1)/2, internal
phases first, then external; MZI ``j`` runs column by column, top to bottom within a column
(see :attr:`MZIMesh.layout`). Bounds [0, 2pi) rad, periodic.

Chip draws come from ``chip_rng`` in a fixed order (coupler errors, phase offsets, drift
coefficients) as standard normals that are then scaled, so the draw never depends on
``sigma`` or ``drift``, and changing sigma rescales the same chip.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SimulatedDevice
from .calibration import CalibrationModelBase

#: Wavelength (m), silicon thermo-optic coefficient (1/K), heated length (m): see docstring.
WAVELENGTH = 1.55e-6
DN_DT = 1.8e-4
HEATER_LENGTH = 200e-6
#: Drift phase per kelvin of one shifter, rad/K (about 0.146).
BETA = 2 * np.pi / WAVELENGTH * DN_DT * HEATER_LENGTH
#: Relative per-shifter spread of ``BETA`` (unitless).
BETA_SPREAD = 0.1
#: Prior std of a detector's relative gain (responsivity times output coupling): about
#: 0.4 dB, the usual chip-to-chip spread of photodiode responsivity and grating couplers.
GAIN_SCALE = 0.1
#: Default neighbour crosstalk fraction (unitless) and read noise (fraction of full scale).
CROSSTALK = 0.02
READ_NOISE = 0.003
_TWO_PI = 2 * np.pi
_EPS_POWER = 1e-12


def clements_layout(n_modes: int) -> np.ndarray:
    """``(M, 2)`` int array: ``(column, top mode)`` of each MZI, in parameter order."""
    return np.array(
        [(c, m) for c in range(n_modes) for m in range(c % 2, n_modes - 1, 2)], dtype=np.int64
    ).reshape(-1, 2)


def _neighbours(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of the ``2M`` shifters, the index of the heater above and below it in the
    same column; ``2M`` (a zero pad) where there is none. Shapes ``(2M,)``."""
    m = len(layout)
    prev, nxt = np.full(m, -1), np.full(m, -1)
    j = np.nonzero(layout[1:, 0] == layout[:-1, 0])[0]  # consecutive MZIs sharing a column
    nxt[j], prev[j + 1] = j + 1, j

    def both(idx: np.ndarray) -> np.ndarray:  # internal block, then external block
        return np.concatenate([np.where(idx >= 0, idx, 2 * m), np.where(idx >= 0, idx + m, 2 * m)])

    return both(prev), both(nxt)


def _column_maps(layout: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index maps that write column ``c`` as ``U <- A[c] * U + B[c] * U[perm[c]]``.

    ``A``/``B`` index into ``[T00 (M), T01 (M), T10 (M), T11 (M), 1, 0]``; ``perm`` is each
    mode's partner (itself when the mode has no MZI in that column). Shapes ``(n, n)``."""
    m = len(layout)
    idx_a = np.full((n, n), 4 * m)  # untouched mode: coefficient 1
    idx_b = np.full((n, n), 4 * m + 1)  # ... and no partner term
    perm = np.tile(np.arange(n), (n, 1))
    for j, (c, top) in enumerate(layout):
        idx_a[c, top], idx_b[c, top], perm[c, top] = j, m + j, top + 1
        idx_a[c, top + 1], idx_b[c, top + 1], perm[c, top + 1] = 3 * m + j, 2 * m + j, top
    return idx_a, idx_b, perm


class MeshModel(torch.nn.Module):
    """``model(theta (n_params,), x (batch, N)) -> (batch, N)`` intensities, differentiable
    in both, computed in ``theta``'s dtype (complex64 for float32, complex128 for float64)."""

    t: torch.Tensor
    k: torch.Tensor
    bias: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    perm: torch.Tensor

    def __init__(
        self,
        n_modes: int,
        bs_error: np.ndarray,
        phase_bias: np.ndarray,
        kappa: float,
        saturation: float | None = None,
        arm_loss: float = 0.0,
    ):
        super().__init__()
        self.n_modes = n = int(n_modes)
        self.saturation = None if not saturation else float(saturation)
        self.arm_amp = 10 ** (-float(arm_loss) / 20)  # field transmission of a shifter's arm
        layout = clements_layout(n)
        e = np.clip(bs_error, -1 + 1e-9, 1 - 1e-9)  # (M, 2): first, second coupler
        self.register_buffer("t", torch.as_tensor(np.sqrt((1 + e) / 2)))
        self.register_buffer("k", torch.as_tensor(np.sqrt((1 - e) / 2)))
        self.register_buffer("bias", torch.as_tensor(np.asarray(phase_bias, float)))
        self.kappa = float(kappa)
        up, down = _neighbours(layout)
        self.register_buffer("up", torch.as_tensor(up))
        self.register_buffer("down", torch.as_tensor(down))
        idx_a, idx_b, perm = _column_maps(layout, n)
        self.register_buffer("idx_a", torch.as_tensor(idx_a))
        self.register_buffer("idx_b", torch.as_tensor(idx_b))
        self.register_buffer("perm", torch.as_tensor(perm))

    def applied_phases(self, theta: torch.Tensor) -> torch.Tensor:
        """Programmed ``(n_params,)`` -> phases the light sees ``(n_params,)``, rad."""
        p = torch.remainder(theta, _TWO_PI)
        if self.kappa:
            padded = torch.cat([p, p.new_zeros(1)])
            p = p + self.kappa * (padded[self.up] + padded[self.down])
        return p + self.bias.to(theta.dtype)

    def transfer_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        """Mesh transfer matrix ``U (N, N)``, complex, output = ``U @ input``."""
        real = theta.dtype
        a = self.applied_phases(theta)
        m = a.shape[0] // 2
        t, k = self.t.to(real), self.k.to(real)
        t1, t2, k1, k2 = t[:, 0], t[:, 1], k[:, 0], k[:, 1]
        amp = torch.full_like(a[:m], self.arm_amp)
        e_th = torch.polar(amp, a[:m])  # exp(i theta), times the arm's loss
        e_ph = torch.polar(amp, a[m:])  # exp(i phi)
        # DC(e2) P(theta) DC(e1) P(phi), multiplied out for all MZIs at once.
        t00 = e_ph * (t1 * t2 * e_th - k1 * k2)
        t01 = 1j * (k1 * t2 * e_th + t1 * k2)
        t10 = 1j * e_ph * (t1 * k2 * e_th + k1 * t2)
        t11 = t1 * t2 - k1 * k2 * e_th
        one = torch.ones(1, dtype=t00.dtype, device=t00.device)
        coef = torch.cat([t00, t01, t10, t11, one, torch.zeros_like(one)])
        # unbind: one autograd node for all columns instead of one select per column.
        col_a = coef[self.idx_a].unsqueeze(-1).unbind(0)
        col_b = coef[self.idx_b].unsqueeze(-1).unbind(0)
        u = torch.eye(self.n_modes, dtype=t00.dtype, device=t00.device)
        for a_c, b_c, p_c in zip(col_a, col_b, self.perm.unbind(0)):  # columns only
            u = a_c * u + b_c * u[p_c]
        return u

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = self.transfer_matrix(theta)
        x = x.to(theta.dtype)
        x = x / torch.sqrt((x * x).sum(-1, keepdim=True) + _EPS_POWER)
        field = x.to(u.dtype) @ u.transpose(0, 1)
        power = field.real**2 + field.imag**2
        if self.saturation:  # detector compression: a model-form error no calibration model has
            power = power / (1 + power / self.saturation)
        return power


class MeshCalibrationModel(CalibrationModelBase):
    """Clements mesh with unknown coupler errors and phase offsets (``mzi``).

    Parameters: ``bs_error (M, 2)`` (unitless, datasheet 0, scale ``sigma``),
    ``phase_bias (2M,)`` rad (datasheet 0, scale ``sigma_phase``), and with ``output_gain``
    (default) ``gain (N,)``, each detector's responsivity times its output coupling relative
    to the datasheet (unitless, datasheet 1, scale ``gain_scale``): every chip's detectors
    and output couplers differ, and a lossy mesh (e.g. unequal arm loss) dims every output,
    which a unitary model cannot express otherwise. With ``fit_crosstalk`` also the scalar
    ``kappa`` (datasheet ``kappa``, scale ``kappa_scale``), for a design whose crosstalk is
    not trusted. Fixed: topology (and ``kappa`` by default). Same physics as
    :class:`~blackbox_sat.sim.mzi.MeshModel`, batched over settings."""

    bs_error: torch.Tensor
    phase_bias: torch.Tensor
    gain: torch.Tensor
    kappa: float | torch.Tensor  # a parameter with fit_crosstalk, else a fixed float
    up: torch.Tensor
    down: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    perm: torch.Tensor

    def __init__(
        self,
        n_modes: int,
        kappa: float,
        sigma: float = 0.15,
        sigma_phase: float = 0.15,
        fit_crosstalk: bool = False,
        kappa_scale: float = 0.01,
        output_gain: bool = True,
        gain_scale: float = GAIN_SCALE,
    ):
        super().__init__()
        self.n_modes = n = int(n_modes)
        layout = clements_layout(n)
        m = len(layout)
        self._add("bs_error", np.zeros((m, 2)), sigma)
        self._add("phase_bias", np.zeros(2 * m), sigma_phase)
        self.output_gain = bool(output_gain)
        if self.output_gain:
            self._add("gain", np.ones(n), gain_scale)
        if fit_crosstalk:
            self._add("kappa", float(kappa), kappa_scale)
        else:
            self.kappa = float(kappa)
        up, down = _neighbours(layout)
        idx_a, idx_b, perm = _column_maps(layout, n)
        for name, arr in (
            ("up", up),
            ("down", down),
            ("idx_a", idx_a),
            ("idx_b", idx_b),
            ("perm", perm),
        ):
            self.register_buffer(name, torch.as_tensor(arr))

    def transfer_matrices(self, thetas: torch.Tensor) -> torch.Tensor:
        """``U (S, N, N)`` complex for settings ``thetas (S, n_params)``."""
        real = thetas.dtype
        p = torch.remainder(thetas, _TWO_PI)
        kappa = self.kappa
        if isinstance(kappa, torch.Tensor) or kappa:
            padded = torch.cat([p, p.new_zeros(p.shape[0], 1)], 1)
            kappa = kappa.to(real) if isinstance(kappa, torch.Tensor) else kappa
            p = p + kappa * (padded[:, self.up] + padded[:, self.down])
        a = p + self.phase_bias.to(real)
        m = a.shape[1] // 2
        e = self.bs_error.to(real).clamp(-1 + 1e-9, 1 - 1e-9)
        t, k = torch.sqrt((1 + e) / 2), torch.sqrt((1 - e) / 2)
        t1, t2, k1, k2 = t[:, 0], t[:, 1], k[:, 0], k[:, 1]
        e_th = torch.polar(torch.ones_like(a[:, :m]), a[:, :m])
        e_ph = torch.polar(torch.ones_like(a[:, m:]), a[:, m:])
        t00 = e_ph * (t1 * t2 * e_th - k1 * k2)
        t01 = 1j * (k1 * t2 * e_th + t1 * k2)
        t10 = 1j * e_ph * (t1 * k2 * e_th + k1 * t2)
        t11 = t1 * t2 - k1 * k2 * e_th
        s = thetas.shape[0]
        one = torch.ones(s, 1, dtype=t00.dtype, device=t00.device)
        coef = torch.cat([t00, t01, t10, t11, one, torch.zeros_like(one)], 1)  # (S, 4M + 2)
        col_a = coef[:, self.idx_a].unsqueeze(-1).unbind(1)  # each (S, N, 1)
        col_b = coef[:, self.idx_b].unsqueeze(-1).unbind(1)
        u = torch.eye(self.n_modes, dtype=t00.dtype, device=t00.device).expand(s, -1, -1)
        for a_c, b_c, p_c in zip(col_a, col_b, self.perm.unbind(0)):
            u = a_c * u + b_c * u[:, p_c]
        return u

    def batched(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = self.transfer_matrices(thetas)
        x = x.to(thetas.dtype)
        x = x / torch.sqrt((x * x).sum(-1, keepdim=True) + _EPS_POWER)
        field = torch.matmul(x.to(u.dtype), u.transpose(1, 2))
        power = field.real**2 + field.imag**2
        return power * self.gain.to(power.dtype) if self.output_gain else power


class MZIMesh(SimulatedDevice):
    """One Clements-mesh chip; see the module docstring for physics, units and sources.

    Error arrays (chip draws, rescaled by sigma): ``bs_error (M, 2)`` coupler errors,
    ``phase_offset (n_params,)`` rad, ``beta_j (n_params,)`` rad/K. ``layout (M, 2)`` gives
    each MZI's (column, top mode) in parameter order."""

    periodic = True
    input_bounds = (-1.0, 1.0)
    full_scale = 1.0

    def __init__(
        self,
        seed: int = 0,
        sigma: float = 0.15,
        noise: float = READ_NOISE,
        n_modes: int = 16,
        drift: float = 0.0,
        sigma_phase: float | None = None,
        crosstalk: float = CROSSTALK,
        programming_noise: float = 0.005,
        dac_bits: int | None = 12,
        beta: float = BETA,
        beta_spread: float = BETA_SPREAD,
        saturation: float | None = None,
        arm_loss: float = 0.0,
    ):
        n = int(n_modes)
        if n < 2:
            raise ValueError(f"n_modes must be >= 2, got {n_modes}")
        super().__init__(
            seed=seed,
            noise=noise,
            programming_noise=programming_noise,
            dac_bits=dac_bits,
            sigma=sigma,
            n_modes=n_modes,
            drift=drift,
            sigma_phase=sigma_phase,
            crosstalk=crosstalk,
            beta=beta,
            beta_spread=beta_spread,
            saturation=saturation,
            arm_loss=arm_loss,
        )
        self.saturation = None if not saturation else float(saturation)
        self.arm_loss = float(arm_loss)
        self.n_modes = self.in_dim = self.out_dim = n
        self.layout = clements_layout(n)
        m = len(self.layout)
        self.n_params = 2 * m
        self.bounds = (np.zeros(self.n_params), np.full(self.n_params, _TWO_PI))
        self.sigma = float(sigma)
        self.sigma_phase = self.sigma if sigma_phase is None else float(sigma_phase)
        self.drift = float(drift)
        self.crosstalk = float(crosstalk)
        # Fixed draw order, independent of every scale, so sigma/drift sweeps are smooth.
        z_bs = self.chip_rng.standard_normal((m, 2))
        z_phase = self.chip_rng.standard_normal(self.n_params)
        z_beta = self.chip_rng.standard_normal(self.n_params)
        self.bs_error = np.clip(self.sigma * z_bs, -1 + 1e-9, 1 - 1e-9)
        self.phase_offset = self.sigma_phase * z_phase
        self.beta_j = float(beta) * (1 + float(beta_spread) * z_beta)

    def _build_model(self, nominal: bool) -> torch.nn.Module:
        m = len(self.layout)
        if nominal:
            return MeshModel(
                self.n_modes, np.zeros((m, 2)), np.zeros(self.n_params), self.crosstalk
            )
        bias = self.phase_offset + self.beta_j * self.drift
        return MeshModel(
            self.n_modes, self.bs_error, bias, self.crosstalk, self.saturation, self.arm_loss
        )

    def calibration_model(
        self,
        fit_crosstalk: bool = False,
        crosstalk: float | None = None,
        output_gain: bool = True,
    ) -> torch.nn.Module:
        """Grey-box model for calibration (:class:`~.calibration.MeshCalibrationModel`): known
        topology and crosstalk, unknown coupler errors and phase offsets at their datasheet 0
        and (``output_gain``) detector gains at 1; prior scales ``sigma`` and ``sigma_phase``
        (0.15 where those are 0). ``fit_crosstalk`` makes ``kappa`` a parameter too, started
        at ``crosstalk`` (default: this chip's)."""
        kappa = self.crosstalk if crosstalk is None else float(crosstalk)
        return MeshCalibrationModel(
            self.n_modes,
            kappa,
            sigma=self.sigma or 0.15,
            sigma_phase=self.sigma_phase or 0.15,
            fit_crosstalk=fit_crosstalk,
            output_gain=output_gain,
        )

    def calibration_truth(
        self, fit_crosstalk: bool = False, output_gain: bool = True
    ) -> dict[str, torch.Tensor]:
        """This chip's values of :meth:`calibration_model`'s parameters (drift included in the
        phase offsets; detector gains 1, the simulator has no gain error): loaded with
        ``model.load_truth``, the model equals :meth:`true_model`."""
        truth = {
            "bs_error": torch.as_tensor(self.bs_error, dtype=torch.float64).clone(),
            "phase_bias": torch.as_tensor(
                self.phase_offset + self.beta_j * self.drift, dtype=torch.float64
            ),
        }
        if output_gain:
            truth["gain"] = torch.ones(self.n_modes, dtype=torch.float64)
        if fit_crosstalk:
            truth["kappa"] = torch.tensor(self.crosstalk, dtype=torch.float64)
        return truth

    def transfer_matrix(self, theta: np.ndarray, nominal: bool = False) -> np.ndarray:
        """``U (N, N)`` complex128 of this chip (or the datasheet) at setting ``theta``."""
        model = self.nominal_model() if nominal else self.true_model()
        assert isinstance(model, MeshModel)
        with torch.no_grad():
            return model.transfer_matrix(torch.as_tensor(np.asarray(theta, float))).numpy()


def mzi(
    seed: int = 0,
    sigma: float = 0.15,
    noise: float = READ_NOISE,
    n_modes: int = 16,
    drift: float = 0.0,
    sigma_phase: float | None = None,
    crosstalk: float = CROSSTALK,
    programming_noise: float = 0.005,
    dac_bits: int | None = 12,
    **kw,
) -> MZIMesh:
    """A Clements-mesh chip. ``sigma``: coupler splitting-ratio error std (unitless) and,
    unless ``sigma_phase`` is given, phase-offset std (rad). ``noise``: read noise std as a
    fraction of full scale. ``drift``: temperature change in K. ``crosstalk``: neighbour
    heater fraction. ``programming_noise``: rad per query. ``dac_bits``: None for off.
    Other keywords (``beta`` rad/K, ``beta_spread``, ``saturation``, ``arm_loss``) go to :class:`MZIMesh`."""
    return MZIMesh(
        seed=seed,
        sigma=sigma,
        noise=noise,
        n_modes=n_modes,
        drift=drift,
        sigma_phase=sigma_phase,
        crosstalk=crosstalk,
        programming_noise=programming_noise,
        dac_bits=dac_bits,
        **kw,
    )
