"""``harmonic``: coordinate steps from the harmonic law of phases.

In a linear optical circuit where a phase shifter appears once, the field is affine in
``exp(i theta_j)``, so every detected intensity (every output of every input) is exactly
``a + b cos theta_j + c sin theta_j`` in one phase, the others fixed; coupler errors and fixed
offsets keep this form, a push-pull drive or a phase met twice adds a second harmonic. A
step measures the minibatch at ``2K`` new values of one phase (order ``K``; the current
point's outputs are reused), fits all ``batch x out_dim`` harmonics by least squares,
rebuilds the outputs at any phase, minimises the *real* training loss (PNN readout + cross
entropy) over a grid of the phase in software and moves ``damping`` times the way to the
minimiser. This is sequential minimal optimisation (Nakanishi, Fujii, Todo, Phys. Rev.
Research 2, 043158 (2020), "NFT") and Rotosolve (Ostaszewski, Grant, Benedetti, Quantum 5,
391 (2021)) applied to every output of a PNN, so the loss can be any function of them.
Only the contract is used: ``periodic`` picks the coordinates (others are left alone; none
periodic is an error), the bounds give the period, settings wrap by ``info.project``.

Hybrid PNN: the readout acts on measured outputs, so after every minibatch chunk it takes
``readout_steps`` Adam steps on the outputs known at the current theta for the last
``readout_memory`` minibatches (:mod:`..training.readout_memory`), at no setting; the
minimisation then uses the current readout. The input layer changes the device's inputs,
so no measurement here gives its gradient: it keeps its identity start.

Harmonic check (``check_every`` steps and the first ``checks_first``): one setting at a
random held-out phase. An error above ``check_tol`` of the output spread and above 3 x the
read noise (measured once, from a repeated setting) buys two more settings; the order is
raised if the order-``K+1`` fit's residual is under half the order-``K`` one, and a
coordinate neither fits takes guarded steps (the move is measured, kept if better). Once
half of 3 or more checked coordinates needed a higher order it is the device's default.

Why the defaults (the measurements are in docs/experiments.md, "The harmonic method on
mzi"): cyclic sweeps beat random permutations and blocks; the damping starts at 1.8 and
decays to 0.3, because over-relaxation pays for coupled phases (successive over-relaxation)
while minibatch noise grows with it; the circular mean of the last quarter's iterates is
returned; no priority, extrapolation, per-coordinate damping or recalled-curve rule paid.
``mrr`` and ``freespace`` declare no periodic parameter, so this method refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from blackbox_sat.devices.contract import InvalidInput
from blackbox_sat.devices.metered import BudgetExhausted
from blackbox_sat.training.config import RunConfig, build
from blackbox_sat.training.context import MINIBATCH, TrainContext
from blackbox_sat.training.pnn import readout_loss
from blackbox_sat.training.readout_memory import readout_memory

from .registry import MethodResult, register


@dataclass(frozen=True)
class HarmonicConfig(RunConfig):
    damping: float = 1.8  # multiple of the move to the grid minimiser (>1: over-relaxation)
    damping_end: float | None = (
        0.3  # damping at the end of the budget, linear in settings (None: constant)
    )
    refresh: int = 16  # new minibatch every this many coordinate steps
    sweep: Literal["cyclic", "random", "blocks"] = (
        "cyclic"  # coordinate order (random: permutations)
    )
    block: int = 16  # coordinates per block (sweep="blocks")
    average: float = 0.25  # circular mean of the iterates over this final fraction of the budget
    order: Literal["auto"] | int = (
        "auto"  # "auto" (start at 1, detect higher) or a fixed harmonic order
    )
    max_order: int = 2  # highest order "auto" raises a coordinate to
    check_every: int = 20  # one held-out harmonic check every this many steps (0: never)
    checks_first: int = 4  # ... and on the first steps, so that the order is known early
    check_tol: float = 0.15  # check error / output spread (and > 3 noise) that raises the order
    grid: int = 128  # phase grid points over one period (plus a local refine)
    batch: int = MINIBATCH
    readout_lr: float = 0.03  # hybrid PNN: Adam on the readout from measured outputs (0: off)
    readout_memory: int = 8  # ... on the last this many minibatches
    readout_steps: int = 10  # ... this many steps after every minibatch chunk


#: The method's own options (its configuration less what every method accepts).
HARMONIC_DEFAULTS = {
    k: v for k, v in asdict(HarmonicConfig()).items() if k not in asdict(RunConfig())
}


# --- harmonic algebra (pure, vectorised) --------------------------------------------------
def offsets(order: int) -> np.ndarray:
    """``(2K+1,)`` equispaced phase offsets (rad) from the current phase, 0 first."""
    return 2 * np.pi * np.arange(2 * order + 1) / (2 * order + 1)


def basis(phi: np.ndarray, order: int) -> np.ndarray:
    """``(S, 2K+1)`` design matrix ``[1, cos phi, sin phi, cos 2phi, sin 2phi, ...]``."""
    phi = np.asarray(phi, float)[:, None]
    k = np.arange(1, order + 1)[None, :]
    cs = np.stack([np.cos(k * phi), np.sin(k * phi)], -1).reshape(len(phi), 2 * order)
    return np.concatenate([np.ones((len(phi), 1)), cs], 1)


def fit_harmonic(phi: np.ndarray, ys: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """Least-squares fit of every output: ``phi (S,)``, ``ys (S, B, O)`` -> coefficients
    ``(2K+1, B, O)`` and the residual RMS scaled to a noise estimate (0 if exactly determined)."""
    a = basis(phi, order)
    flat = ys.reshape(len(phi), -1)
    coef, *_ = np.linalg.lstsq(a, flat, rcond=None)
    dof = len(phi) - a.shape[1]
    resid = float(np.sqrt(np.mean((a @ coef - flat) ** 2) * len(phi) / dof)) if dof > 0 else 0.0
    return coef.reshape((a.shape[1], *ys.shape[1:])), resid


def predict(coef: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Outputs ``(G, B, O)`` at phases ``phi (G,)`` from coefficients ``(2K+1, B, O)``."""
    return np.einsum("gp,pbo->gbo", basis(phi, (coef.shape[0] - 1) // 2), coef)


def grid_losses(
    ctx: TrainContext, coef: np.ndarray, phi: np.ndarray, labels: torch.Tensor
) -> np.ndarray:
    """Minibatch training loss ``(G,)`` of the outputs rebuilt at every phase, through the PNN."""
    y = torch.as_tensor(predict(coef, phi))
    g, b, o = y.shape
    with torch.no_grad():
        ce = F.cross_entropy(ctx.pnn(y.reshape(g * b, o)), labels.repeat(g), reduction="none")
    return ce.reshape(g, b).mean(1).numpy()


def minimise(
    ctx: TrainContext, coef: np.ndarray, phi0: float, labels: torch.Tensor, grid: int = 128
) -> float:
    """Phase of least rebuilt loss: a grid over one period, then a finer grid around its best."""
    phi = phi0 + 2 * np.pi * np.arange(grid) / grid
    best = phi[int(np.argmin(grid_losses(ctx, coef, phi, labels)))]
    fine = best + np.linspace(-1, 1, 33) * 2 * np.pi / grid
    return float(fine[int(np.argmin(grid_losses(ctx, coef, fine, labels)))])


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


# --- state shared across sweeps -----------------------------------------------------------
@dataclass
class HarmonicState:
    """What a sweep carries to the next: the outputs ``y (B, O)`` known at the current theta
    on minibatch ``idx`` (measured, or rebuilt by the last fit), the read-noise estimate, the
    per-coordinate orders (0: not checked, the device default applies) and the record kept
    for ``extra``."""

    order: np.ndarray  # (n_params,) int
    default_order: int = 1
    idx: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    noise: float | None = None  # RMS read noise of one output, from a repeated setting
    steps: int = 0
    settings: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("current", "noise", "fit", "check", "refit", "guard"), 0
        )
    )
    checks: list = field(
        default_factory=list
    )  # (step, coordinate, order, error / spread, error / noise)
    raised: list = field(default_factory=list)  # (step, coordinate, new order)
    rough: set = field(default_factory=set)  # coordinates no order up to max_order fits
    visited: list = field(default_factory=list)
    loss_trace: list = field(default_factory=list)  # rebuilt minibatch loss after each step

    def order_of(self, j: int) -> int:
        return int(self.order[j]) or self.default_order


def new_state(info, cfg: dict) -> HarmonicState:
    return HarmonicState(
        np.zeros(info.n_params, int), 1 if cfg["order"] == "auto" else int(cfg["order"])
    )


def _config(options: dict) -> dict:
    """The method's options as a dict, checked and coerced like ``--set``."""
    cfg = asdict(build(HarmonicConfig, options, what="harmonic option"))
    return {k: cfg[k] for k in HARMONIC_DEFAULTS}


def periodic_coords(info) -> np.ndarray:
    """Indices of the periodic parameters of ``info`` (a DeviceInfo); a clear error if none."""
    coords = np.flatnonzero(np.asarray(info.periodic, bool))
    if len(coords) == 0:
        raise InvalidInput(
            "method 'harmonic' needs periodic parameters (phases, device.periodic), but this device "
            "declares none; use spsa or blackbox-sat instead"
        )
    return coords


def harmonic_sweep(
    ctx: TrainContext,
    theta: np.ndarray,
    coords,
    idx: np.ndarray,
    state: HarmonicState | None = None,
    rng: np.random.Generator | None = None,
    **options,
) -> tuple[np.ndarray, dict]:
    """One harmonic coordinate step per entry of ``coords`` on training rows ``idx (B,)``.

    ``theta (n_params,)`` in device units; ``options``: keys of :data:`HARMONIC_DEFAULTS`.
    Returns the new theta and ``info``: ``state`` (pass it back to reuse the current outputs,
    the noise estimate and the detected orders), ``steps`` taken and ``stopped``
    (``"budget"`` when the next step was unaffordable or the device ran out)."""
    cfg = _config(options)
    info, dev = ctx.info, ctx.device
    if state is None:
        state = new_state(info, cfg)
    rng = rng if rng is not None else np.random.default_rng([ctx.seed, 0x4A52])
    theta, idx = info.project(theta), np.asarray(idx)
    labels = torch.as_tensor(ctx.y_train[idx])
    per = sum(
        dev.settings_needed(min(MINIBATCH, len(idx) - i)) for i in range(0, len(idx), MINIBATCH)
    )
    if state.idx is None or not np.array_equal(state.idx, idx):
        y = None
        same_size = state.idx is not None and len(state.idx) == len(idx)
        if state.y is not None and same_size:  # same rows reshuffled (small sets): reuse
            assert state.idx is not None
            old, new = np.argsort(state.idx), np.argsort(idx)
            if np.array_equal(state.idx[old], idx[new]):
                y = np.empty_like(state.y)
                y[new] = state.y[old]
        state.idx, state.x, state.y = idx.copy(), ctx.device_inputs(ctx.f_train[idx]), y
    periods = info.high - info.low
    x_batch = state.x
    assert x_batch is not None  # set with state.idx just above

    def measure(th: np.ndarray, kind: str) -> np.ndarray:
        # at most MINIBATCH inputs per setting (docs/protocol.md): a larger batch is several settings
        th = info.project(th)
        parts = [
            dev.query(th, x_batch[i : i + MINIBATCH], purpose="train")
            for i in range(0, len(idx), MINIBATCH)
        ]
        state.settings[kind] += per
        return np.concatenate(parts)

    def at(j: int, dphi: float) -> np.ndarray:  # theta with phase j moved by dphi rad
        th = theta.copy()
        th[j] += dphi * periods[j] / (2 * np.pi)
        return th

    def affordable(n: int) -> bool:
        return dev.remaining is None or dev.remaining >= n * per

    steps, stopped = 0, None
    try:
        for j in map(int, coords):
            k = state.order_of(j)
            if not affordable(2 * k + (state.y is None) + (state.noise is None)):
                stopped = "budget"
                break
            if state.y is None:  # new minibatch: measure the current point
                state.y = measure(theta, "current")
                if state.noise is None:  # once: the same setting again gives the noise scale
                    y2 = measure(theta, "noise")
                    state.noise, state.y = _rms(y2 - state.y) / math.sqrt(2), (state.y + y2) / 2
            phi0 = 2 * np.pi * (theta[j] - info.low[j]) / periods[j]
            dphi = offsets(k)
            ys = [state.y] + [measure(at(j, d), "fit") for d in dphi[1:]]
            coef, _ = fit_harmonic(phi0 + dphi, np.stack(ys), k)
            check = cfg["check_every"] and (
                state.steps < cfg["checks_first"] or state.steps % cfg["check_every"] == 0
            )
            if check and affordable(1):
                coef, k = _check(
                    ctx, state, cfg, j, k, phi0, dphi, ys, coef, rng, measure, at, affordable
                )
            # the step: grid minimiser of the rebuilt loss, over-relaxed/damped unless that is worse
            target = minimise(ctx, coef, phi0, labels, int(cfg["grid"]))
            delta = (target - phi0 + np.pi) % (2 * np.pi) - np.pi
            cand = np.array([phi0, phi0 + cfg["damping"] * delta, phi0 + delta])
            losses = grid_losses(ctx, coef, cand, labels)
            pick = 1 if losses[1] <= losses[0] else 2
            new_y = predict(coef, cand[pick : pick + 1])[0]
            if j in state.rough and affordable(
                1
            ):  # no harmonic fits: keep a move only if measured better
                y_m = measure(at(j, cand[pick] - phi0), "guard")
                with torch.no_grad():
                    l_m = float(readout_loss(ctx.pnn, y_m, labels))
                pick, new_y = (pick, y_m) if l_m < losses[0] else (0, state.y)
            theta = info.project(at(j, cand[pick] - phi0))
            state.y = new_y
            state.visited.append(j)
            state.loss_trace.append(round(float(losses[pick]), 5))
            state.steps += 1
            steps += 1
    except BudgetExhausted:  # someone else spent the budget: keep the last complete step
        stopped = "budget"
    return theta, {"state": state, "steps": steps, "stopped": stopped}


def _check(ctx, state, cfg, j, k, phi0, dphi, ys, coef, rng, measure, at, affordable):
    """Held-out check of coordinate ``j``'s order-``k`` fit; raises the order when needed.
    Returns the coefficients to use and the order they have."""
    # a random held-out phase between fitted points: at 3 points a 2nd harmonic aliases onto
    # the 1st, and a fixed phase could sit where the aliased terms agree
    gap = 2 * np.pi / len(dphi)
    d = float(rng.uniform(0.25, 0.75)) * gap + gap * int(rng.integers(len(dphi)))
    y_c = measure(at(j, d), "check")
    spread = _rms(np.std(np.stack(ys), axis=1)) + 1e-12  # output spread over the minibatch
    err = _rms(y_c - predict(coef, np.array([phi0 + d]))[0])
    noise = max(state.noise or 0.0, 1e-12)
    state.checks.append((state.steps, j, k, round(err / spread, 4), round(err / noise, 2)))
    auto = cfg["order"] == "auto"
    if (
        err > cfg["check_tol"] * spread
        and err > 3 * noise
        and auto
        and k < cfg["max_order"]
        and affordable(2)
    ):
        # two more points in the widest gaps: 2k + 4 points, one more than order k + 1 needs,
        # so both fits have a residual; the order goes up only if it explains clearly more
        extra = [d + gap / 2 if d % gap < gap / 2 else d - gap / 2, math.pi + d]
        ys = np.stack(list(ys) + [y_c] + [measure(at(j, e), "refit") for e in extra])
        phis = phi0 + np.concatenate([dphi, [d], extra])
        coef_lo, r_lo = fit_harmonic(phis, ys, k)
        coef_hi, r_hi = fit_harmonic(phis, ys, k + 1)
        if r_lo > 2 * r_hi:
            coef, k = coef_hi, k + 1
            state.raised.append((state.steps, j, k))
        else:
            coef = coef_lo
        if min(r_lo, r_hi) > max(cfg["check_tol"] * spread, 3 * noise):
            state.rough.add(j)  # neither order fits: guarded steps from now on
    if auto:
        state.order[j] = k
        known = state.order[state.order > 0]
        if len(known) >= 3 and np.mean(known > state.default_order) >= 0.5:
            state.default_order += 1  # most checked coordinates needed more: the device does
    return coef, k


def coordinate_stream(coords: np.ndarray, kind: str, rng: np.random.Generator, block: int = 16):
    """Endless coordinates: ``random`` (a new permutation per sweep), ``cyclic``, or
    ``blocks`` (contiguous blocks of ``block``, in a random block order per sweep)."""
    if kind not in ("random", "cyclic", "blocks"):
        raise ValueError(f"sweep must be 'random', 'cyclic' or 'blocks', got {kind!r}")
    blocks = [coords[i : i + block] for i in range(0, len(coords), block)]
    while True:
        if kind == "random":
            yield from rng.permutation(coords)
        elif kind == "cyclic":
            yield from coords
        else:
            for b in rng.permutation(len(blocks)):
                yield from blocks[b]


@register(
    "harmonic",
    HarmonicConfig,
    needs="device",
    summary="coordinate steps from the harmonic law of phases (NFT/Rotosolve on every output)",
    requires=("periodic",),
)
def harmonic(ctx: TrainContext) -> MethodResult:
    """A thin loop over :func:`harmonic_sweep`: ``refresh`` coordinates per minibatch until
    the budget is spent, the damping scheduled over the budget; the accuracy curve is
    recorded after every chunk."""
    out, _ = harmonic_run(ctx, {k: getattr(ctx.config, k) for k in HARMONIC_DEFAULTS})
    assert out is not None  # no law test asked for: never abandoned
    return out


def harmonic_run(
    ctx: TrainContext,
    options: dict | None = None,
    holds: Callable[[HarmonicState], bool] | None = None,
) -> tuple[MethodResult | None, HarmonicState]:
    """The ``harmonic`` method's run from ``theta0`` with ``options`` (keys of
    :data:`HARMONIC_DEFAULTS`; the rest default as for ``--method harmonic``). ``holds``, if
    given, is asked once, after the chunk that completes the first ``checks_first`` steps
    (their held-out checks): False abandons the run, ``(None, state)``. The law is tested
    by the run itself, so a caller that goes on gets exactly the ``harmonic`` method's
    settings, minibatches and device noise, not a run shifted by a separate test."""
    cfg = _config(options or {})
    info = ctx.info
    coords = periodic_coords(info)
    rng = np.random.default_rng([ctx.seed, 0x4A52])
    state = new_state(info, cfg)
    stream = coordinate_stream(coords, cfg["sweep"], rng, int(cfg["block"]))
    batches = ctx.minibatches(int(cfg["batch"]))
    theta, phase_sum, n_avg = info.project(ctx.theta0), 0.0, 0
    period = np.where(info.periodic, info.high - info.low, 1.0)
    d0, d1 = cfg["damping"], cfg["damping_end"]
    memory = readout_memory(ctx.pnn, int(cfg["readout_memory"]), float(cfg["readout_lr"]))
    while ctx.device.settings_used < ctx.budget:
        spent = ctx.device.settings_used / max(ctx.budget, 1)
        chunk = [next(stream) for _ in range(max(1, int(cfg["refresh"])))]
        damping = d0 if d1 is None else d0 + spent * (d1 - d0)
        theta, out = harmonic_sweep(
            ctx, theta, chunk, next(batches), state, rng, **{**cfg, "damping": damping}
        )
        if memory is not None and state.y is not None:  # free: outputs already measured
            memory.add(state.y, ctx.y_train[state.idx])
            memory.train(int(cfg["readout_steps"]))
        if holds is not None and (state.steps >= cfg["checks_first"] or out["stopped"]):
            if not holds(state):
                return None, state
            holds = None
        if cfg["average"] and spent >= 1 - cfg["average"]:  # circular mean: phases wrap
            phase_sum, n_avg = (
                phase_sum + np.exp(2j * np.pi * (theta - info.low) / period),
                n_avg + 1,
            )
        ctx.snapshot(theta)
        if out["stopped"]:
            break
    if n_avg:
        mean = info.low + np.mod(np.angle(phase_sum), 2 * np.pi) * period / (2 * np.pi)
        theta = info.project(np.where(info.periodic, mean, theta))
    return MethodResult(
        theta,
        {
            "steps": state.steps,
            "periodic": len(coords),
            "skipped_non_periodic": info.n_params - len(coords),
            "visited": state.visited,
            "settings": state.settings,
            "noise": state.noise,
            "checks": state.checks,
            "raised": state.raised,
            "orders": {int(j): int(state.order[j]) for j in np.flatnonzero(state.order)},
            "default_order": state.default_order,
            "rough": sorted(state.rough),
            "averaged": n_avg,
            "loss_trace": state.loss_trace,
            "readout_steps": memory.steps if memory is not None else 0,
        },
    ), state
