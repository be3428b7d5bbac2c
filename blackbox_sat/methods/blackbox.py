"""Device-query methods built on physics-aware gradients.

| method | what it is |
|---|---|
| ``pat`` | device forward, surrogate backward, plain Adam; one surrogate fit, no refinement |
| ``blackbox`` | the pipeline of :mod:`..pipeline` with ``rho = 0`` and SPSA refinement |
| ``blackbox-sat`` | the full pipeline: SAT in trust regions, then ``sa-spsa`` refinement |
| ``insitu-sat`` | the paper's in-situ SAT: device forward (and ascent), backward through a given approximate model |

The black-box methods receive nothing but the device contract object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from blackbox_sat.devices.metered import BudgetExhausted
from blackbox_sat.devices.spec import resolve_factory
from blackbox_sat.training.config import RunConfig
from blackbox_sat.training.context import TrainContext
from blackbox_sat.training.physics_aware import Anchors, device_step
from blackbox_sat.training.pipeline import (
    BudgetBook,
    PipelineConfig,
    run_pat,
    run_pipeline,
    surrogate_pays,
    without_surrogate,
)
from blackbox_sat.training.refine import RefineConfig

from .harmonic import (
    HARMONIC_DEFAULTS,
    HarmonicState,
    coordinate_stream,
    harmonic_run,
    harmonic_sweep,
    new_state,
)
from .registry import MethodResult, register


@dataclass(frozen=True)
class BlackboxConfig(PipelineConfig):
    """``blackbox``: the pipeline without SAT, refined by plain SPSA."""

    rho: float = 0.0
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(rule="spsa", rho=0.0))


@dataclass(frozen=True)
class GuidedEsConfig(BlackboxConfig):
    """``guided-es``: the pipeline's rounds with guided-ES steps only (the surrogate is the
    guide, refitted on the pairs; no probes), then guided refinement."""

    steps: Literal["auto", "surrogate", "guided", "harmonic"] = "guided"
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(rule="guided", rho=0.0))


@dataclass(frozen=True)
class PatConfig(PipelineConfig):
    """``pat``: one surrogate fit, then plain physics-aware steps: no SAT, no refinement."""

    rho: float = 0.0
    lr_factor: float = 0.1
    refine_fraction: float = 0.0


@register(
    "blackbox-sat",
    PipelineConfig,
    summary="surrogate, SAT in trust regions, sharpness-aware ZO refinement",
)
def blackbox_sat(ctx: TrainContext) -> MethodResult:
    return _pipeline_or_harmonic(ctx)


@register(
    "blackbox",
    BlackboxConfig,
    summary="surrogate, plain physics-aware training in trust regions, SPSA refinement",
)
def blackbox(ctx: TrainContext) -> MethodResult:
    return _pipeline_or_harmonic(ctx)


#: Coordinate sweeps (2 settings a phase) a budget must buy before harmonic steps pay on an
#: all-periodic device; below, SPSA. Whole runs on mzi N=16, seeds 0-2: harmonic against
#: spsa 0.360 / 0.383 at 500 settings (1 sweep), 0.393 / 0.423 at 750, 0.465 / 0.452 at
#: 1000 (2 sweeps), 0.529 / 0.501 at 1500: a coordinate method needs passes to couple phases.
#: A hybrid PNN is exempt: harmonic runs also train its readout on every measured minibatch,
#: which SPSA does not (mzi N=32 hybrid, 2000 settings, about 1 sweep: 0.760 / 0.718 against
#: spsa's 0.592 / 0.622, seeds 0 / 1).
HARMONIC_MIN_SWEEPS = 2


def harmonic_pays(budget: int, n_periodic: int) -> bool:
    """Whether ``budget`` settings buy ``HARMONIC_MIN_SWEEPS`` harmonic sweeps."""
    return budget >= HARMONIC_MIN_SWEEPS * 2 * n_periodic


def _pipeline_or_harmonic(ctx: TrainContext) -> MethodResult:
    """An exact law before a learned model. Where every parameter is periodic (and
    ``steps=auto``), the ``harmonic`` method starts, and its first chunk tests the harmonic
    law on held-out phases (:func:`.harmonic.harmonic_run`, ``checks_first`` checks, about
    40 settings). If it holds (no coordinate that no harmonic order up to ``max_order``
    fits), that run goes on and no surrogate is built: the result is the ``harmonic``
    method's own run, setting for setting. On ``mzi`` every surrogate round of the loop was
    rejected (the check loss rose by 0.3-1.3 nats) and the loop reached 0.43 against
    harmonic's 0.64, after 400 settings and 600 s of surrogate fits (docs/experiments.md,
    "A loop that measures its own surrogate"). Below the budget rule's threshold
    (:func:`..training.pipeline.surrogate_pays`) no surrogate would be built anyway, and the
    ``harmonic`` method gets the whole budget without the test. Otherwise (or if the law
    fails): the pipeline from ``theta0``, with harmonic rounds as its fallback. A budget
    too small for two sweeps (:func:`harmonic_pays`) goes to SPSA instead."""
    if ctx.config.steps != "auto" or not ctx.info.periodic.all():
        theta, extra = run_pipeline(ctx, ctx.config, harmonic_rounds(ctx))
        return MethodResult(theta, extra)
    if not ctx.pnn.trainable and not harmonic_pays(ctx.budget, ctx.info.n_params):
        theta, extra = without_surrogate(ctx, ctx.config, None, BudgetBook(ctx))
        return MethodResult(theta, extra)
    before, verdict = ctx.device.settings_used, {"law_test": 0}

    def holds(state: HarmonicState) -> bool:
        verdict["law_test"] = ctx.device.settings_used - before
        return not state.rough and bool(state.checks)

    test = surrogate_pays(ctx.config, ctx.budget, ctx.info.n_params)  # else no surrogate anyway
    out, state = harmonic_run(ctx, holds=holds if test else None)
    if out is None:  # the law failed: the settings spent on it are gone, the record kept
        theta, extra = run_pipeline(ctx, ctx.config, harmonic_rounds(ctx, state))
        extra["harmonic_law"] = {"holds": False, "rough": sorted(state.rough)}
        extra["budget_by_step"]["law_test"] = verdict["law_test"]
        return MethodResult(theta, extra)
    checks = state.checks[: HARMONIC_DEFAULTS["checks_first"]]
    used = ctx.device.settings_used - before
    out.extra.update(
        surrogate=None,
        harmonic_law={"holds": True, "checks": checks} if test else {"holds": None},
        budget_by_step={
            "law_test": verdict["law_test"],
            "harmonic_steps": used - verdict["law_test"],
        },
    )
    return out


@register(
    "guided-es",
    GuidedEsConfig,
    summary="guided evolution strategies, the pipeline's surrogate as the guide",
)
def guided_es(ctx: TrainContext) -> MethodResult:
    theta, extra = run_pipeline(ctx, ctx.config)
    return MethodResult(theta, extra)


def harmonic_rounds(ctx: TrainContext, state: HarmonicState | None = None):
    """The pipeline's harmonic fallback: ``(theta, n_settings) -> theta``, harmonic coordinate
    steps (:mod:`.harmonic`, its default options) in minibatch chunks of ``refresh``
    coordinates, cyclic across calls, the damping scheduled over the whole budget. ``state``:
    the orders, noise and rough coordinates already known (from a failed law test). None for
    a device with no periodic parameter."""
    if not ctx.info.periodic.any():
        return None
    opts = dict(HARMONIC_DEFAULTS)
    coords = np.flatnonzero(ctx.info.periodic)
    rng = np.random.default_rng([ctx.seed, 0x4A52])
    stream = coordinate_stream(coords, opts["sweep"], rng, int(opts["block"]))
    batches = ctx.minibatches(int(opts["batch"]))
    state = state if state is not None else new_state(ctx.info, opts)
    d0, d1 = opts["damping"], opts["damping_end"]

    def rounds(theta: np.ndarray, n_settings: int) -> np.ndarray:
        start = ctx.device.settings_used
        state.idx = state.y = None  # theta moved since: the outputs known are stale
        while True:
            left = n_settings - (ctx.device.settings_used - start)
            chunk = min(int(opts["refresh"]), (left - 1) // (2 * state.default_order))
            if chunk < 1:
                return theta
            spent = ctx.device.settings_used / max(ctx.budget, 1)
            damping = d0 if d1 is None else d0 + spent * (d1 - d0)
            theta, out = harmonic_sweep(
                ctx, theta, [next(stream) for _ in range(chunk)], next(batches), state, rng,
                **{**opts, "damping": damping},
            )  # fmt: skip
            ctx.snapshot(theta)
            if out["stopped"]:
                return theta

    return rounds


@register("pat", PatConfig, summary="device forward, surrogate backward, plain Adam")
def pat(ctx: TrainContext) -> MethodResult:
    theta, extra = run_pat(ctx, ctx.config)
    return MethodResult(theta, extra)


def approximate_model(ctx: TrainContext, spec: str | None):
    """The differentiable stand-in of ``insitu-sat``: ``nominal`` (the simulator's datasheet
    model) or a user's ``module:function`` returning a torch callable ``(theta, x) -> y``
    (the function may take the device contract object)."""
    if spec in (None, "nominal"):
        getter = getattr(ctx.source, "nominal_model", None)
        if getter is None:
            raise TypeError(
                "insitu-sat needs an approximate model: this device has no nominal_model(); pass your own "
                "with --set model=package.module:function"
            )
        return getter()
    fn = resolve_factory(spec)
    try:
        return fn(ctx.source)
    except TypeError:
        return fn


#: Measured on mzi N=16 (seed 0, budget 2000): lr 0.03 -> 0.47, lr 0.01 -> 0.71 (rho 0; the
#: nominal model's gradient error makes larger steps unstable); with rho 0.05 the ascent on
#: the approximate model (0.66) beats the paper's ascent on the device (0.44), which halves
#: the steps a budget buys. Three anchored steps per setting (``inner_steps``, see
#: :class:`..physics_aware.Anchors`) raised it to 0.852 (seed 0) and 0.796 (seed 1).
@dataclass(frozen=True)
class InsituSatConfig(RunConfig):
    model: str = "nominal"  # ``nominal`` or ``package.module:function`` returning a torch model
    rho: float = 0.05
    adaptive: bool = False
    ascent: Literal["device", "surrogate"] = "surrogate"
    lr: float = 0.01  # normalized units per step
    lr_final: float = 0.1  # cosine decay to lr * lr_final
    inner_steps: int = 3


@register(
    "insitu-sat",
    InsituSatConfig,
    needs="approximate",
    summary="device forward, backward through an approximate model, SAT ascent on the device",
)
def insitu_sat(ctx: TrainContext) -> MethodResult:
    cfg, info = ctx.config, ctx.info
    model = approximate_model(ctx, cfg.model)
    scale = info.scale
    theta = ctx.theta0.copy()
    u = torch.tensor(theta / scale, requires_grad=True)
    opt = torch.optim.Adam([u], lr=cfg.lr)
    if ctx.pnn.trainable:
        opt.add_param_group({"params": list(ctx.pnn.parameters()), "lr": 0.01})
    per_step = 2 if cfg.rho > 0 and cfg.ascent == "device" else 1
    n_steps = max(1, ctx.settings_left() // per_step)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps, eta_min=cfg.lr * cfg.lr_final)
    batches, losses = ctx.minibatches(), []
    anchors = Anchors(len(ctx.y_train), info.out_dim)
    try:
        while ctx.settings_left() >= per_step:
            opt.zero_grad()
            idx = next(batches)
            theta, step = device_step(
                ctx, theta, idx, model, opt, u, anchors, batches, cfg.inner_steps,
                rho=cfg.rho, ascent=cfg.ascent, adaptive=cfg.adaptive,
            )  # fmt: skip
            sched.step()
            losses.append(step.loss)
            ctx.snapshot(theta)
    except BudgetExhausted:
        pass
    return MethodResult(
        theta,
        {"steps": len(losses), "final_loss": float(np.mean(losses[-20:])) if losses else None},
    )
