"""The black-box SAT pipeline: surrogate, physics-aware SAT in trust regions, ZO refinement.

Within one settings budget ``B`` (every number is a rule, not a device constant; the
measurement behind each rule is in docs/experiments.md, "Pipeline design choices"):

0. **Budget rule** (:func:`surrogate_pays`): a surrogate only when the initial design holds
   at least ``n_params / 2`` settings and ``min_rounds`` full rounds fit; otherwise the
   budget goes to harmonic steps (every parameter periodic) or to ``spsa``.
1. **Initial design** (:mod:`.initial_design`): ``init_fraction * B`` settings, at most
   ``DESIGN_PER_PARAM * n_params`` of them in a box of ``radius`` bound widths, each
   measured on ``inputs_per_setting`` training inputs; a larger share is first walked by
   SPSA from ``theta0``, and the box is measured around where the walk ends.
2. **Surrogate**: ``surrogate=auto`` keeps the family that best predicts the
   ``theta``-driven change of the outputs on held-out settings (:mod:`.surrogate_choice`).
3. **Rounds** until the refinement share is left, each of one step type chosen by
   :mod:`.step_choice` from predicted against measured decreases: *surrogate* rounds
   (:mod:`.surrogate_steps`: physics-aware SAT steps with the device forward and the
   surrogate backward, Adam step ``lr_factor * radius``, clipped to the trust region, plus
   ``inner_steps`` anchored steps that cost no setting), or *guided* / *harmonic* rounds
   while the surrogate fails. Each round's end point is accepted or rejected by the check
   loss (:class:`.trust_region.TrustRegion`: tolerance = the check loss's measured
   spread; accept grows the region, reject returns and shrinks it). After a surrogate round,
   ``probes_per_round`` new settings and a warm refit on the last ``refit_window``
   settings: the surrogate must be right where training is now.
4. **Refinement**: the last ``refine_fraction * B`` settings go to zeroth-order refinement
   (:mod:`.refine`; ``sa-spsa`` for ``blackbox-sat``, ``spsa`` for ``blackbox``), kept only
   if the check loss did not rise.

**SAT radius.** ``rho`` (L2, bound widths) ramps up linearly over the budget, as warm-up is
usual for SAM: early on the ascent only slows the descent. ``extra["budget_by_step"]``
records the settings spent per step type.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import numpy as np

from blackbox_sat.devices.metered import BudgetExhausted

from .config import RunConfig
from .context import TrainContext
from .guided import GuidedSteps
from .initial_design import design_split, measure_design, spsa_walk
from .objectives import check_loss, check_minibatch, check_outputs, predicted_loss
from .refine import SPSA_START_STEP, RefineConfig, refine
from .step_choice import STEP_TYPES, SurrogateMonitor
from .surrogate_choice import Dataset, SurrogateConfig, refit_plan, select_surrogate
from .surrogate_steps import SurrogateSteps
from .trust_region import TrustRegion


@dataclass(frozen=True)
class PipelineConfig(RunConfig):
    """Options of the loop in the module docstring (radii and rho in normalized units)."""

    RENAMED: ClassVar[dict[str, str]] = {  # keys of runs written before the typed configuration
        "refine_rule": "refine.rule",
        "surrogate_kw": "surrogate",
        "surrogate_candidates": "surrogate.candidates",
        "gp_max_params": "surrogate.gp_max_params",
    }
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    rho: float = 0.02
    rho_ramp: float = 1.0
    adaptive: bool = False
    ascent: Literal["device", "surrogate"] = "surrogate"
    init_fraction: float = 0.2
    radius: float = 0.05
    radius_min: float = 0.025
    radius_max: float = 0.3
    grow: float = 1.25
    shrink: float = 0.5
    global_fraction: float = 0.0
    spread: Literal["box", "shells"] = "box"
    inputs_per_setting: int = 128
    probes_per_round: int = 25
    steps_per_round: int = 25
    refit_steps: int | None = None
    refit_window: int | None = None
    learn_from_steps: bool = True
    inner_steps: int = 3
    lr_factor: float = 0.25
    lr: float | None = None
    clip_to_region: bool = True
    accept_tol: Literal["auto"] | float = "auto"
    check_repeats: int = 3
    refine_fraction: float = 0.15
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(rule="sa-spsa", rho=0.02))
    refresh_after: int = 0
    # step type of the rounds: "auto" (step_choice.py's rule), or one type for every round
    steps: Literal["auto", "surrogate", "guided", "harmonic"] = "auto"
    guided_c: float = 0.02  # guided-ES perturbation per coordinate (normalized), as refine's c
    guided_step: float = 0.005  # guided-ES first step (normalized; refine.py's table)
    guide_k: int = 4  # surrogate gradients spanning the guide subspace
    guide_alpha: float = 0.5  # share of the guided search's variance that stays isotropic
    min_rounds: int = 4  # fewest full rounds the surrogate needs to pay off (budget rule)

    def __post_init__(self) -> None:
        if not (
            0 < self.init_fraction < 1
            and 0 <= self.refine_fraction < 1
            and self.init_fraction + self.refine_fraction < 1
        ):
            raise ValueError(
                "need 0 < init_fraction, 0 <= refine_fraction, init_fraction + refine_fraction < 1"
            )
        if not (0 < self.radius_min <= self.radius <= self.radius_max):
            raise ValueError("need 0 < radius_min <= radius <= radius_max")


class Timer:
    def __init__(self):
        self.s = {}

    def add(self, key: str, t0: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t0


def initial_fit(
    ctx: TrainContext, cfg: PipelineConfig, timer: Timer
) -> tuple[Dataset, object, dict, np.ndarray]:
    """Steps 1-2 of the module docstring: the initial design and the surrogate chosen on it.
    Returns ``(data, surrogate, choice, theta)``, ``theta`` the point the loop starts from.

    The design's share beyond ``DESIGN_PER_PARAM * n_params`` settings is first walked by
    SPSA, and the box is measured around where the walk ends: a 12-parameter device held
    ``theta0`` through a 400-setting box while ``spsa`` reached 0.78. The walk's settings
    are not surrogate data: a design spread along the walk fitted worse (``mrr``: 0.70
    against 0.85 when the whole share was walked and kept)."""
    data = Dataset()
    t0 = time.perf_counter()
    walk, box = design_split(cfg, ctx.budget, ctx.info.n_params)
    theta = spsa_walk(ctx, walk) if walk else ctx.theta0.copy()
    measure_design(ctx, data, theta, cfg.radius, box, cfg, seed=ctx.seed)
    timer.add("init_queries", t0)
    t0 = time.perf_counter()
    ctx.phase("surrogate fit")
    surrogate, choice = select_surrogate(ctx, data, cfg)
    timer.add("surrogate_fit", t0)
    return data, surrogate, choice, theta


def sat_radius(ctx: TrainContext, cfg: PipelineConfig) -> float:
    """SAT's ``rho`` now: ramped linearly with the settings spent (module docstring)."""
    if not cfg.rho_ramp:
        return cfg.rho
    return cfg.rho * min(1.0, ctx.device.settings_used / max(1.0, cfg.rho_ramp * ctx.budget))


class BudgetBook:
    """Settings spent per step type, for ``extra["budget_by_step"]``."""

    def __init__(self, ctx: TrainContext):
        self.ctx = ctx
        self.spent: dict[str, int] = {}

    @contextlib.contextmanager
    def on(self, kind: str):
        before = self.ctx.device.settings_used
        try:
            yield
        finally:
            used = self.ctx.device.settings_used - before
            self.spent[kind] = self.spent.get(kind, 0) + used


def guided_step(cfg: PipelineConfig, spent: float) -> float:
    """Step size (normalized, Adam) of guided-ES rounds after a fraction ``spent`` of the
    budget: ``guided_step`` with Spall's decay ``((1 + A) / (k + 1 + A))^0.602`` (``A`` = 10 %
    of the steps) read in budget fractions. Guided rounds start from a trained point, where
    refinement's measured steps apply (:mod:`.refine`: from the mrr oracle point, Adam step
    0.005 kept 0.85 of 0.89, 0.015 fell to 0.67). With the surrogate steps' ``lr_factor *
    radius`` instead, guided rounds on ``mrr`` raised the check loss by 0.2-1 nats."""
    return cfg.guided_step * (0.1 / (spent + 0.1)) ** 0.602


def surrogate_pays(cfg: PipelineConfig, budget: int, n_params: int) -> bool:
    """The budget rule: the surrogate is used only when its initial design holds at least
    ``n_params / 2`` settings (each of ``inputs_per_setting`` inputs) and the rounds' share
    of the budget affords ``min_rounds`` full rounds (steps and probes). Below that the
    initial fit costs more than the rounds can return, and the budget goes to the fallback
    steps from ``theta0`` (docs/experiments.md, "Small budgets")."""
    rounds = (1 - cfg.init_fraction - cfg.refine_fraction) * budget
    full = cfg.min_rounds * (cfg.steps_per_round + cfg.probes_per_round)
    return cfg.init_fraction * budget >= n_params / 2 and rounds >= full


#: Fallback rounds: ``(theta, n_settings) -> theta`` spending at most ``n_settings`` settings
#: (harmonic coordinate steps are a method-level step, passed in by the methods).
Fallback = Callable[[np.ndarray, int], np.ndarray]


def run_pipeline(
    ctx: TrainContext, cfg: PipelineConfig, harmonic: Fallback | None = None
) -> tuple[np.ndarray, dict]:
    """The loop of the module docstring. Returns ``(theta, extra)``. ``harmonic``: the
    harmonic coordinate rounds to fall back on when every parameter is periodic."""
    book = BudgetBook(ctx)
    use_harmonic = harmonic is not None and bool(ctx.info.periodic.all())
    if not surrogate_pays(cfg, ctx.budget, ctx.info.n_params):
        return without_surrogate(ctx, cfg, harmonic if use_harmonic else None, book)
    refine_rule = cfg.refine.rule if cfg.refine_fraction > 0 else None
    # the refinement's share, plus one setting for its accept test
    reserve = int(cfg.refine_fraction * ctx.budget) + 1 if refine_rule else 0
    timer = Timer()
    with book.on("init_design"):
        data, surrogate, choice, theta = initial_fit(ctx, cfg, timer)
    refit_steps, refit_window = refit_plan(cfg, choice["chosen"])
    steps = SurrogateSteps(ctx, cfg, surrogate, data)
    steps.reset(theta)
    guided = GuidedSteps(ctx, cfg.guided_c, cfg.guide_k, cfg.guide_alpha)
    monitor = SurrogateMonitor(fallback="harmonic" if use_harmonic else "guided", fixed=cfg.steps)
    if monitor.fixed == "harmonic" and not use_harmonic:
        raise ValueError("steps=harmonic needs a device whose parameters are all periodic")
    region = TrustRegion.from_config(cfg)
    check_idx = check_minibatch(ctx)
    round_log: list[dict] = []
    refreshes = 0
    round_size = cfg.steps_per_round + cfg.probes_per_round
    try:
        with book.on("checks"):
            repeats = [
                check_outputs(ctx, steps.theta, check_idx) for _ in range(max(1, cfg.check_repeats))
            ]
        region.calibrate([r[0] for r in repeats], cfg.accept_tol)
        centre, y_centre = steps.theta.copy(), np.mean([r[1] for r in repeats], axis=0)
        kind, mark = monitor.next_kind(region.tol), ctx.device.settings_used
        while True:
            left = ctx.settings_left() - reserve - 1  # one setting for the accept test
            n = {
                "surrogate": min(cfg.steps_per_round, steps.affordable(reserve + 1)),
                "guided": min(round_size, left) // 2,
                "harmonic": min(round_size, left) if left >= 3 else 0,
            }[kind]
            if n <= 0:
                break
            ctx.phase(f"round {len(round_log) + 1} ({kind} steps)")
            start = steps.theta.copy()
            box = region.box(start / ctx.info.scale) if cfg.clip_to_region else None
            t0 = time.perf_counter()
            with book.on(f"{kind}_steps"):
                if kind == "surrogate":
                    steps.run(n, sat_radius(ctx, cfg), box, cfg.inner_steps)
                elif kind == "guided":
                    lr = guided_step(cfg, ctx.device.settings_used / ctx.budget)
                    steps.reset(guided.run(start, n, lr, surrogate, data, box))
                else:
                    steps.reset(harmonic(start, n))  # type: ignore[misc]
            timer.add(f"{kind}_steps", t0)
            with book.on("checks"):
                end_loss, y_end = check_outputs(ctx, steps.theta, check_idx)
            expected = predicted_loss(ctx, surrogate, check_idx, centre, y_centre, centre)
            predicted = expected - predicted_loss(
                ctx, surrogate, check_idx, centre, y_centre, steps.theta
            )
            round_log.append({
                "kind": kind, "radius": region.radius, "start_loss": region.check_loss,
                "end_loss": end_loss, "predicted_decrease": predicted,
                "settings": ctx.device.settings_used - mark,
            })  # fmt: skip
            accepted = region.judge(end_loss, resize=kind == "surrogate")
            monitor.observe(
                kind, predicted, round_log[-1]["start_loss"] - end_loss,
                round_log[-1]["settings"], accepted,
            )  # fmt: skip
            mark = ctx.device.settings_used
            if kind == "surrogate":
                round_log[-1]["step_losses"] = [h["loss"] for h in steps.history[-n:]]
            if accepted:
                centre, y_centre = steps.theta.copy(), y_end
            else:
                steps.reset(start)
            steps.set_radius(region.radius)
            kind = monitor.next_kind(region.tol)
            t0 = time.perf_counter()
            if kind == "surrogate":
                with book.on("probes"):
                    measure_design(
                        ctx, data, steps.theta, region.radius,
                        min(cfg.probes_per_round, ctx.settings_left() - reserve), cfg,
                        seed=ctx.seed * 1000 + len(round_log),
                    )  # fmt: skip
            timer.add("probe_queries", t0)
            if kind == "surrogate" or round_log[-1]["kind"] == "guided":  # new data to learn
                t0 = time.perf_counter()
                scratch = bool(cfg.refresh_after) and region.rejected_run >= cfg.refresh_after
                steps.refit(refit_window, refit_steps, scratch=scratch)
                if scratch:
                    region.rejected_run, refreshes = 0, refreshes + 1
                timer.add("surrogate_fit", t0)
    except BudgetExhausted:
        pass
    theta = steps.theta
    extra = {
        "check_loss_std": region.check_std,
        "accept_tol": region.tol,
        "surrogate": choice["chosen"],
        "surrogate_selection": choice,
        "initial_design": dict(
            zip(("spsa_walk", "box"), design_split(cfg, ctx.budget, ctx.info.n_params))
        ),
        "rounds": len(round_log),
        "rounds_by_step": {k: sum(r["kind"] == k for r in round_log) for k in STEP_TYPES},
        "accepted_rounds": region.accepted,
        "final_radius": region.radius,
        "round_log": round_log,
        "refit_steps": refit_steps,
        "refit_window": refit_window,
        "refreshes": refreshes,
    }
    if refine_rule and ctx.settings_left() > 3:
        t0 = time.perf_counter()
        with book.on("refine"):
            theta, extra["refine"] = refine_and_check(ctx, cfg, theta, region, check_idx, surrogate)
        timer.add("refine", t0)
    extra["budget_by_step"] = book.spent
    extra["time_s"] = {**timer.s, "device_queries": ctx.device.device_time}
    return theta, extra


def without_surrogate(
    ctx: TrainContext, cfg: PipelineConfig, harmonic: Fallback | None, book: BudgetBook
) -> tuple[np.ndarray, dict]:
    """Below the budget rule's threshold: the whole budget on the fallback steps from
    ``theta0``: harmonic coordinate steps, or SPSA with the ``spsa`` method's settings
    (first step 0.015, the returned point chosen on validation)."""
    theta = ctx.theta0.copy()
    if harmonic is not None:
        with book.on("harmonic_steps"):
            theta = harmonic(theta, ctx.settings_left())
        rule = "harmonic"
    else:
        opt = replace(cfg.refine, rule="spsa", step=SPSA_START_STEP, select="val", rho=0.0)
        with book.on("spsa_steps"):
            theta, _ = refine(ctx, theta, ctx.settings_left(), config=opt)
        rule = "spsa"
    return theta, {"surrogate": None, "without_surrogate": rule, "budget_by_step": book.spent}


def refine_and_check(
    ctx: TrainContext,
    cfg: PipelineConfig,
    theta: np.ndarray,
    region: TrustRegion,
    check_idx,
    surrogate=None,
) -> tuple[np.ndarray, dict]:
    """Step 4: zeroth-order refinement with the budget left but one setting, kept only if the
    device loss on the check minibatch did not rise (the round's accept test, strict)."""
    refined, hist = refine(
        ctx, theta, ctx.settings_left() - 1, config=cfg.refine, surrogate=surrogate
    )
    refined_loss = check_loss(ctx, refined, check_idx)
    kept = refined_loss <= region.check_loss
    return (refined if kept else theta), {
        "rule": cfg.refine.rule,
        "steps": len(hist),
        "check_loss_before": region.check_loss,
        "check_loss_after": refined_loss,
        "kept": bool(kept),
    }


def run_pat(ctx: TrainContext, cfg: PipelineConfig) -> tuple[np.ndarray, dict]:
    """``pat``: one surrogate fit, then plain physics-aware steps until the budget is spent:
    no trust region, no refits, no refinement. Returns ``(theta, extra)``."""
    timer = Timer()
    data, surrogate, choice, theta = initial_fit(ctx, cfg, timer)
    steps = SurrogateSteps(ctx, cfg, surrogate, data)
    steps.reset(theta)
    t0 = time.perf_counter()
    with contextlib.suppress(BudgetExhausted):
        ctx.phase("training")
        steps.run(steps.affordable(0), sat_radius(ctx, cfg))
    timer.add("sat_steps", t0)
    return steps.theta, {
        "surrogate": choice["chosen"],
        "surrogate_selection": choice,
        "steps": len(steps.history),
        "time_s": {**timer.s, "device_queries": ctx.device.device_time},
    }
