"""A surrogate family for interferometric devices that assumes only generic optics.

Model (per ensemble member)::

    y = readout(|E|^2),     E = U(theta) x,
    U(theta) = U0 + sum_j (exp(i * phase_j(theta)) - 1) u_j v_j^T,
    phase_j(theta) = rate_j * (z_j - c_j),

with ``z`` the normalised ``theta`` (:mod:`surrogates.normalize`), ``c`` the expansion centre,
``U0`` a learned complex ``(n_modes, in_dim)`` transfer matrix at the centre and, for every
control parameter ``j`` (a phase shifter), a learned rank-1 complex update ``u_j v_j^T``. The
outputs are intensities, quadratic in the input field ``x``, read out by a learned per-output
gain and offset (or a learned linear map of the intensities).

Why this form: a single phase shifter ``j`` inside any linear optical circuit enters the
transfer matrix as ``L_j diag(.., exp(i theta_j), ..) R_j``, so ``U`` is *exactly* affine in
``exp(i theta_j)`` with a rank-1 coefficient, for any couplers and errors. Truncating the
joint dependence at first order in ``exp(i delta_j) - 1`` is what is approximate: it holds near
the centre ``c``. Nothing of a particular chip (mesh topology, coupler errors, crosstalk) is
assumed; the model sees only ``theta``, ``x``, ``y`` and the periodic mask.

**Input power.** ``E = U x`` takes the inputs as the field. Many chips instead divide one
laser among their input modulators: the source power is fixed and the inputs set only its
split, so the field is ``x / |x|``. ``input_power="auto"`` (the default) decides at the first
fit by a convex test: least-squares fits of ``y_k = x^T A_k x + c_k`` on ``x`` and on
``x / |x|`` (``theta`` ignored), and the better held-out R² wins (``"free"`` / ``"fixed"``
force it). The winning fit's ``A_k`` also starts ``U0`` (``readout_init``): with real inputs
``|u_k . x|^2 = x^T Re(conj(u_k) u_k^T) x``, so ``A_k``'s top two eigenpairs give row ``k`` up
to a phase no intensity sees, where gradient descent on ``U0`` alone is a phase-retrieval
problem with local minima. On the built-in ``mzi`` (which normalises its inputs) the two
fits score 0.91 against 0.98 (500 settings, radius 0.01). With the right input model the
family's held-out Delta-R^2 / gradient cosine at ``theta0`` (500 settings) went from 0.27 /
0.62 to 0.81 / 0.97 at radius 0.02 and from 0.28 / 0.83 to 0.46 / 0.92 at radius 0.05
(0.30 / 0.92 without the readout start); the overall R^2 from 0.78 to 0.99.

Higher orders were tried and dropped (before the input-power test existed, so the 8-mode
figures below may understate them): the full series is ``U0 + u^T D (I - C D)^{-1} v``
with ``D = diag(exp(i delta) - 1)`` and a learned coupling ``C`` between shifters, exact for
any circuit of single-mode phase shifters (the chain of couplings terminates), and refolds
exactly too. On an 8-mode mesh (56 phases, 200 settings x 64 inputs, radius 0.05) it fit no
better than the first-order model (held-out MSE 0.16 against 0.09, theta-part R^2 0.52
both) at seven times the cost per step: what limits the model there is fitting, not the
truncation.

The exact global form is an ordered product, ``U(theta) = prod_j (I + (exp(i delta_j) - 1)
u_j w_j^T) U0`` with ``w_j = U0^{-T} v_j`` and ``w_j . u_j = 1``, taken in the order light
meets the shifters: the first-order parameters fix everything but that order. It is not used
because the first-order fit does not identify single shifters (on ``mzi`` the fitted
``|w_j . u_j|`` has median 0.63-0.75 with phases spread over +-pi) and, for a lossless mesh,
cannot tell the order (``v_j^T U0^{-1} u_k`` is the conjugate of ``v_k^T U0^{-1} u_j``).

Measured on synthetic meshes of 2x2 interferometers with coupler errors (inputs real
fields, 16 inputs per setting): 4 modes, 12 phases, 150 settings in a trust region of 0.03:
theta-part R^2 0.93-0.95 at the centre; after the centre moved by 0.1 bound widths per
phase, re-centring and 300 update steps on 150 settings there gave 0.90-0.94, the same refit
without re-centring 0.51-0.83 and the stale model -0.36-0.46 (three seeds). 8 modes, 56
phases, 200 settings x 64 inputs, radius 0.05: R^2 0.52 but a loss-gradient cosine of
0.96-0.98 at the centre, which is what training uses.

Phase units: a periodic parameter's angle is ``pi * z`` (period ``2 pi`` over its bound width,
``rate = pi`` fixed). A non-periodic parameter (e.g. a heater current) gets a learned
``rate_j``, initialised to ``pi`` (the bound width taken as one period).

**Re-centring.** The first-order model is only accurate near its centre, so as training moves
``theta`` the model must move with it. :meth:`InterferometricSurrogate.recentre` refolds the
current model exactly around a new centre ``c'``::

    U0' = U0 + sum_j (exp(i rate_j (c'_j - c_j)) - 1) u_j v_j^T,    u_j' = exp(i rate_j (c'_j - c_j)) u_j,

which leaves every prediction unchanged (it is the same function, written around ``c'``), and
the warm-started refit on the newest trust-region data then corrects ``U0'``, ``u``, ``v``
where the first-order picture has drifted. Without the refold, the refit must move ``U0`` and
every ``u_j v_j^T`` together to express the local transfer matrix: badly conditioned, and the
stale expansion point keeps large ``exp(i delta) - 1`` factors in every prediction.
:meth:`~InterferometricSurrogate.update` re-centres before refitting: at ``centre`` when
given, else at the centre of the rows it is given. With ``local_radius`` set, training uses
only rows within that L-infinity radius (bound-width units) of the centre.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .neural import EnsembleSurrogate

#: Rows (at most) of the convex quadratic fit that chooses the input model and starts ``U0``,
#: and the most inputs it is run for: it has ``in_dim (in_dim + 1) / 2`` features, 2080 at 64
#: (24k rows, about 20 s on one core).
#: Above that, ``input_power="auto"`` takes the inputs as the field and ``U0`` starts at random.
QUADRATIC_ROWS = 50_000
QUADRATIC_MAX_INPUTS = 64


def _complex_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Real-imaginary pairs ``(*shape, 2)`` of a circular complex normal of total std ``std``."""
    return torch.randn(*shape, 2) * (std / math.sqrt(2.0))


def unit_field(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the last dimension (``0`` stays ``0``): the field of a fixed-power source."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-12)


def _quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """``(n, d) -> (n, d (d + 1) / 2 + 1)``: the products ``x_i x_j`` (``i <= j``) and a 1."""
    iu = torch.triu_indices(x.shape[1], x.shape[1])
    return torch.cat(
        [(x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]], torch.ones(len(x), 1, dtype=x.dtype)], 1
    )


def quadratic_readout(
    x: torch.Tensor, y: torch.Tensor, unit_power: bool, holdout: float = 0.2
) -> tuple[torch.Tensor, float]:
    """Least-squares ``y_k = x^T A_k x + c_k`` with ``theta`` ignored, from real
    ``x (n, in_dim)`` and ``y (n, out_dim)``: the weights ``(n_features, out_dim)`` (see
    :func:`readout_matrices`) fitted on all but the last ``holdout`` share of rows, and their
    R² on that share (pass the rows shuffled; NaN with ``holdout=0``, a fit on every row). With ``unit_power`` the fit is on ``x / |x|`` (a source of fixed power whose
    split the inputs set).

    Linear in ``A`` and ``c``, so it is a convex, quick test of the input model and a start
    for ``U0`` free of the local minima of fitting ``U0`` itself (a phase-retrieval problem).
    """
    x, y = x.double(), y.double()
    feats = _quadratic_features(unit_field(x) if unit_power else x)
    n_fit = len(x) - int(holdout * len(x))
    w = torch.linalg.lstsq(feats[:n_fit], y[:n_fit]).solution
    if n_fit == len(x):
        return w, float("nan")
    resid, dev = feats[n_fit:] @ w - y[n_fit:], y[n_fit:] - y[n_fit:].mean(0)
    return w, float(1 - (resid**2).sum() / (dev**2).sum())


def readout_matrices(
    w: torch.Tensor, in_dim: int, unit_power: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (out_dim, in_dim, in_dim), c (out_dim,))`` from :func:`quadratic_readout`'s weights.
    With unit power ``x^T I x = 1`` lets ``A`` and ``c`` trade a multiple of ``I``; the bulk of
    ``A``'s spectrum (all but its top two eigenvalues) is moved into ``c``."""
    iu = torch.triu_indices(in_dim, in_dim)
    a = torch.zeros(w.shape[1], in_dim, in_dim, dtype=w.dtype)
    a[:, iu[0], iu[1]] = w[:-1].T
    a = (a + a.transpose(1, 2)) / 2  # an off-diagonal weight counts x_i x_j twice
    c = w[-1]
    if unit_power and in_dim > 2:
        bulk = torch.linalg.eigvalsh(a)[:, :-2].mean(1)
        a, c = a - bulk[:, None, None] * torch.eye(in_dim, dtype=w.dtype), c + bulk
    return a, c


class InterferometricStructure(nn.Module):
    """The model of the module docstring for ``M`` stacked members.

    Complex parameters are stored as real ``(..., 2)`` pairs so that optimisers, dtype casts
    and the ensemble's per-member snapshots treat them like any other parameter.
    """

    centre: torch.Tensor
    periodic: torch.Tensor
    unit_power: torch.Tensor

    def __init__(
        self,
        n_members: int,
        n_params: int,
        in_dim: int,
        out_dim: int,
        periodic: np.ndarray,
        n_modes: int | None = None,
        output: str | None = None,
        init_scale: float = 0.3,
    ):
        super().__init__()
        n_modes = max(in_dim, out_dim) if n_modes is None else int(n_modes)
        output = ("gain" if out_dim <= n_modes else "linear") if output is None else output
        if output not in ("gain", "linear"):
            raise ValueError(f"output must be 'gain' or 'linear', got {output!r}")
        if output == "gain" and out_dim > n_modes:
            raise ValueError(
                f"output='gain' reads one mode per output: needs out_dim <= n_modes ({n_modes})"
            )
        self.n_members, self.n_modes, self.output, self.out_dim = (
            n_members,
            n_modes,
            output,
            out_dim,
        )
        self.register_buffer("centre", torch.zeros(n_params))
        self.register_buffer("periodic", torch.as_tensor(np.asarray(periodic, bool)))
        self.register_buffer("unit_power", torch.tensor(False))
        self.log_rate = nn.Parameter(torch.full((n_members, n_params), math.log(math.pi)))
        # With x scaled to unit mean square, entries of variance 1/in_dim give |E|^2 of mean ~1.
        self.u0 = nn.Parameter(_complex_normal((n_members, n_modes, in_dim), 1 / math.sqrt(in_dim)))
        self.u = nn.Parameter(
            _complex_normal((n_members, n_params, n_modes), init_scale / math.sqrt(n_modes))
        )
        self.v = nn.Parameter(
            _complex_normal((n_members, n_params, in_dim), init_scale / math.sqrt(in_dim))
        )
        if output == "gain":
            self.gain = nn.Parameter(torch.ones(n_members, 1, out_dim))
        else:
            eye = torch.zeros(n_modes, out_dim)
            eye[torch.arange(min(n_modes, out_dim)), torch.arange(min(n_modes, out_dim))] = 1.0
            self.gain = nn.Parameter(eye.expand(n_members, -1, -1).clone())
        # y is standardised and |E|^2 starts with mean ~1, hence the offset.
        self.offset = nn.Parameter(torch.full((n_members, 1, out_dim), -1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before the input-power test took the inputs as the field.
        state_dict.setdefault(prefix + "unit_power", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def rate(self) -> torch.Tensor:
        """Phase per normalised unit ``(M, n_params)``: ``pi`` for periodic parameters."""
        return torch.where(
            self.periodic, torch.full_like(self.log_rate, math.pi), self.log_rate.exp()
        )

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch = torch.broadcast_shapes(theta.shape[1:-1], x.shape[1:-1])
        m = self.n_members
        rate = self.rate().reshape(m, *([1] * len(batch)), -1)
        phase = rate * (theta - self.centre)  # (M, S, 1|K, P)
        d = torch.polar(torch.ones_like(phase), phase) - 1
        d = d.expand(m, *batch, d.shape[-1]).reshape(m, -1, d.shape[-1])
        if self.unit_power:
            x = unit_field(x)
        xc = x.expand(m, *batch, x.shape[-1]).reshape(m, -1, x.shape[-1]).to(d.dtype)
        field = self.field(d, xc)
        intensity = field.real**2 + field.imag**2
        if self.output == "gain":
            y = self.gain * intensity[..., : self.out_dim] + self.offset
        else:
            y = torch.baddbmm(self.offset, intensity, self.gain)
        return y.reshape(m, *batch, self.out_dim)

    def field(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output field ``(M, R, n_modes)`` from ``d = exp(i delta) - 1`` ``(M, R, P)`` and the
        complex input field ``x (M, R, in_dim)``: the first-order model."""
        u0, u, v = (torch.view_as_complex(p) for p in (self.u0, self.u, self.v))
        vx = torch.bmm(x, v.transpose(1, 2))  # (M, R, P): v_j . x
        return torch.bmm(x, u0.transpose(1, 2)) + torch.bmm(d * vx, u)

    @torch.no_grad()
    def init_readout(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """Set the read rows of ``U0``, the gain and the offset from a quadratic readout
        ``y_k = x^T A_k x + c_k`` (:func:`readout_matrices`; ``a (out_dim, in_dim, in_dim)``).

        With real inputs ``|u_k . x|^2 = x^T Re(conj(u_k) u_k^T) x``, so ``A_k``'s top two
        eigenpairs give row ``u_k`` up to a phase, which no intensity sees. Only for
        ``output="gain"`` (output ``k`` reads mode ``k``).
        """
        if self.output != "gain":
            return
        evals, evecs = torch.linalg.eigh(a)  # ascending
        top = evals[:, -2:].clamp_min(0).sqrt()
        rows = torch.stack(
            [evecs[:, :, -1] * top[:, 1:2], evecs[:, :, -2] * top[:, 0:1]], -1
        )  # (out, d, 2)
        self.u0.data[:, : self.out_dim] = rows.to(self.u0.dtype)
        self.gain.data.fill_(1.0)
        self.offset.data.copy_(c.to(self.offset.dtype).expand_as(self.offset))

    @torch.no_grad()
    def recentre(self, new_centre: torch.Tensor) -> None:
        """Refold every member around ``new_centre (n_params,)`` (normalised); predictions are
        unchanged up to rounding."""
        shift = torch.polar(
            torch.ones_like(self.log_rate), self.rate() * (new_centre - self.centre)
        )  # (M, P)
        u0, u, v = (torch.view_as_complex(p) for p in (self.u0, self.u, self.v))
        u0 += torch.einsum("mp,mpn,mpi->mni", shift - 1, u, v)
        u *= shift[..., None]
        self.centre.copy_(new_centre)


class InterferometricSurrogate(EnsembleSurrogate):
    """Deep ensemble of :class:`InterferometricStructure` with re-centring.

    Args:
        n_members: ensemble size (default 5).
        n_modes: optical modes of the learned transfer matrix (default ``max(in_dim, out_dim)``).
        output: ``"gain"`` (output ``k`` reads mode ``k`` with a gain and offset; the default
            when ``out_dim <= n_modes``) or ``"linear"`` (a learned map of all intensities).
        init_scale: initial size of the per-shifter updates relative to ``U0``.
        local_radius: if set, fitting and updates use only rows within this L-infinity radius
            (bound-width units, wrapped for periodic parameters) of the current centre.
        input_power: ``"free"`` (the field is ``x``), ``"fixed"`` (the field is ``x / |x|``)
            or ``"auto"`` (the default: the better of the two convex readout fits at the first
            fit, see the module docstring; the fits' held-out R² are in ``readout_r2``).
        readout_init: start ``U0``'s read rows, gain and offset from that fit (default True).
        **kw: training and base keywords of :class:`~surrogates.neural.EnsembleSurrogate`.

    ``x`` is scaled, by one factor for all columns, but not centred (``0`` must stay "no
    light", and ``x / |x|`` must keep its direction). ``theta`` uses the bounds
    frame (:mod:`surrogates.normalize`): phases are measured against the bound width.
    """

    centre_inputs = False
    theta_frame = "bounds"

    def __init__(
        self,
        n_members: int = 5,
        *,
        n_modes: int | None = None,
        output: str | None = None,
        init_scale: float = 0.3,
        local_radius: float | None = None,
        input_power: str = "auto",
        readout_init: bool = True,
        **kw,
    ):
        super().__init__(
            "interferometric",
            n_members,
            structure_kw={"n_modes": n_modes, "output": output, "init_scale": init_scale},
            **kw,
        )
        self.local_radius = None if local_radius is None else float(local_radius)
        if input_power not in ("auto", "free", "fixed"):
            raise ValueError(f"input_power must be 'auto', 'free' or 'fixed', got {input_power!r}")
        self.input_power = input_power
        self.readout_init = bool(readout_init)
        self.readout_r2: dict[str, float] = {}

    def _structure_class(self) -> type[nn.Module]:
        return InterferometricStructure

    @property
    def _structure(self) -> InterferometricStructure:
        """The fitted model, as the structure it is built as."""
        assert isinstance(self.model, InterferometricStructure), "fitted"
        return self.model

    # -- centre ---------------------------------------------------------------------------
    def _data_centre(self, z: torch.Tensor) -> torch.Tensor:
        """Centre ``(n_params,)`` of normalised rows ``z (n, n_params)``; circular mean for
        periodic columns."""
        periodic = torch.as_tensor(self.periodic_mask())
        angle = math.pi * z
        circular = torch.atan2(angle.sin().mean(0), angle.cos().mean(0)) / math.pi
        return torch.where(periodic, circular, z.mean(0))

    @property
    def centre(self) -> np.ndarray:
        """Current expansion centre ``(n_params,)`` in ``theta`` units."""
        assert self.theta_norm is not None, "fitted"
        return self.theta_norm.inverse(self._structure.centre).double().numpy()

    def recentre(self, centre: np.ndarray) -> None:
        """Re-express the model around ``centre (n_params,)`` (``theta`` units) without
        changing its predictions; follow with :meth:`update` on data around it."""
        assert self.theta_norm is not None, "fitted"
        z = self.theta_norm(torch.as_tensor(np.asarray(centre, np.float64)).to(self.dtype))
        self._structure.recentre(z)

    def _initialise(self, data) -> None:
        """Centre the expansion on the data, then choose the input model and start ``U0`` from
        the convex readout fit (module docstring)."""
        self._structure.recentre(self._data_centre(data.theta))
        d = data.x.shape[1]
        if d > QUADRATIC_MAX_INPUTS:
            self.readout_r2 = {}
            self._structure.unit_power.fill_(self.input_power == "fixed")
            return
        n_rows = min(
            QUADRATIC_ROWS, 50_000_000 // (d * (d + 1) // 2 + 1)
        )  # the features in at most 400 MB
        rows = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(self.seed))[
            :n_rows
        ]
        x, y = data.x[rows], data.y[rows]
        powers = ("free", "fixed") if self.input_power == "auto" else (self.input_power,)
        fits = {p: quadratic_readout(x, y, p == "fixed") for p in powers}
        self.readout_r2 = {p: r2 for p, (_, r2) in fits.items()}
        best = max(fits, key=lambda p: fits[p][1])
        self._structure.unit_power.fill_(best == "fixed")
        if self.readout_init:  # the winner refitted on every row
            w, _ = quadratic_readout(x, y, best == "fixed", holdout=0.0)
            self._structure.init_readout(*readout_matrices(w, d, best == "fixed"))

    def _before_update(self, centre: np.ndarray | None) -> None:
        self._centre_from_data = centre is None
        if centre is not None:
            self.recentre(centre)

    def _after_data(self, new) -> None:
        if self._centre_from_data:
            self._structure.recentre(self._data_centre(new.theta))

    def training_data(self):
        """Stored rows, restricted to ``local_radius`` around the centre when it is set."""
        if self.local_radius is None:
            return self.data
        assert self.data is not None, "fitted"
        diff = self.data.theta - self._structure.centre
        periodic = torch.as_tensor(self.periodic_mask())
        diff = torch.where(periodic, torch.remainder(diff + 1, 2) - 1, diff)
        # z spans 2 units per bound width (or per 2 std for unbounded columns).
        near = (diff.abs().amax(dim=1) <= 2 * self.local_radius).numpy()
        if near.sum() == 0:
            raise ValueError(
                f"no stored rows within local_radius={self.local_radius} of the centre"
            )
        return self.data.subset(np.flatnonzero(near))

    # -- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("structure")
        cfg.update(cfg.pop("structure_kw"))
        cfg["local_radius"] = self.local_radius
        cfg["input_power"] = self.input_power
        cfg["readout_init"] = self.readout_init
        return cfg
