"""Gradient-free baselines on the device: ``spsa``, ``ng-cma``, ``ng-ngopt``, ``ng-tbpsa``.

All four query only the metered device, start from ``ctx.theta0``, spend the budget left
after the readout-gain calibration (done by :func:`~blackbox_sat.harness.run.train` before the
method runs), measure every setting on one training minibatch of 128 inputs shared by the
whole step / generation (common random numbers), work in normalized coordinates
``u = theta / scale`` and record the accuracy curve with ``ctx.snapshot``. Nothing here
looks at the test set: test accuracy is only read by ``snapshot`` (purpose ``eval``).

``spsa``
    :func:`blackbox_sat.training.refine.refine` alone, from ``theta0``, with the whole budget (rule
    ``spsa``; ``--set rule=rdsa`` or ``sa-spsa`` switch the estimator). Defaults: the
    refine defaults (Rademacher pairs with c = 0.02 on one minibatch, Spall's gain decay,
    Adam-normalised steps) except ``step = 0.015`` per coordinate for the first step: a
    start from scratch needs larger steps than refining a trained point (measured across
    ``mzi``, ``mrr`` and ``freespace`` on validation accuracy; table in
    :mod:`blackbox_sat.training.refine`). ``--set normalize=None`` gives plain SPSA, whose gain is
    calibrated on training minibatches so that the first step moves ``step`` per coordinate.
    Returned point: the Polyak average of the last quarter of the iterates or the last
    iterate, whichever has the higher validation accuracy measured on the device
    (``select="val"``: 2 x ceil(n_val / 128) charged settings, purpose ``train``).

``ng-cma``
    nevergrad's ``ParametrizedCMA(elitist=False, diagonal=False)``: a **non-elitist, full**
    CMA-ES, population ``4 + floor(3 ln n)`` (CMA's own rule; 19 for 160 parameters),
    initial step ``sigma0 = 0.02`` of the normalized range per coordinate, and it
    **recommends the distribution mean** (``es.mean`` of the wrapped pycma strategy, read
    from the optimizer's public ``es``). nevergrad's ``provide_recommendation()`` for CMA returns
    ``es.result.xbest``, the best *single noisy evaluation* (each on its own minibatch),
    i.e. the luckiest draw. pycma's stopping rules are switched off (a stop would make
    nevergrad restart from ``theta0``); ``extra["restarts"]`` checks it.

``ng-tbpsa``
    nevergrad's ``TBPSA`` (non-naive: it recommends ``current_center``, the mean of the
    selected parents). Its default initial population is ``mu = n``, ``lambda = 4 n``; here
    ``initial_popsize`` (``mu``) is the same ``4 + floor(3 ln n)`` rule (``lambda = 4 mu``),
    and TBPSA's population control still doubles ``mu`` when the loss stops improving.

``ng-ngopt``
    nevergrad's ``NGOpt``, told that the function is noisy and continuous, budget = the
    settings left. For 160 bounded parameters and 2000 settings it picks
    ``Chaining([ConfPortfolio([DiagonalCMA, PSO, GeneticDE]), OptimisticNoisyOnePlusOne],
    budgets=['half'])`` (recorded in ``extra["optimizer"]``). The chain has no
    recommendation of its own, so nevergrad falls back to the *pessimistic best* point of
    its archive: with one evaluation per point, the lowest single noisy minibatch loss. It
    is used as-is, as the out-of-the-box baseline. A "generation" for NGOpt is a block of
    ``4 + floor(3 ln n)`` candidates asked at once and told together.

nevergrad's defaults are poor for this problem. Measured on ``mrr`` (160 parameters),
digits, budget 2000, training seeds 0-2, mean test accuracy (validation in brackets):

============================================================  ==============
configuration                                                 accuracy
============================================================  ==============
``ng.optimizers.CMA`` as shipped (noisy: ``OldCMA``, non-      .21 (.21)
elitist, step 0.15 of the range, best-evaluation recommend.)
``ng-cma``, recommending the best single evaluation           .42 (.41)
``ng-cma`` (step 0.02, distribution mean)                     .45 (.43)
``ng.optimizers.TBPSA`` as shipped (``mu = 160``: 4 gens.)    .10 (.05)
``ng-tbpsa`` (``mu = 19``, step 0.02)                         .23 (.23)
``ng-ngopt`` (its own choice and recommendation)              .11 (.10)
============================================================  ==============

Initial step ``sigma0`` (mean validation accuracy, seeds 0-2; the default is the best mean
over the three built-in devices, chosen on validation):

=========  ==================  ==================  ==================
sigma0     mrr cma / tbpsa     freespace           mzi
=========  ==================  ==================  ==================
0.01       .46 / .21           .21 / .06           .32 / .25
0.02       .43 / .23           .22 / .10           .40 / .31
0.05       .26 / .20           .26 / .11           .47 / .30
0.1        .19 (seed 0) / -    -                   -
=========  ==================  ==================  ==================

(an early prototype saw nevergrad's CMA stall and NGOpt choose Cobyla. With
nevergrad 1.0.12 and the function declared noisy, ``CMA`` resolves to the non-elitist
``OldCMA`` and NGOpt to the chain above. The poor parts are the step size (0.15 of the range
is about 8 times too large) and the recommendation rule.)

Bounds: non-periodic, finitely bounded coordinates are a bounded ``ng.p.Array`` (nevergrad's
default "bouncing" handling) in normalized units; periodic or unbounded coordinates are a
free ``ng.p.Array`` and the objective wraps (periodic) or leaves them (unbounded) through
``info.project``. Both arrays use ``sigma = sigma0`` so one unit of nevergrad's
standardized space is ``sigma0`` normalized units. On
:class:`~blackbox_sat.devices.metered.BudgetExhausted` a method stops and returns its
current mean recommendation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from blackbox_sat.devices.metered import BudgetExhausted
from blackbox_sat.training.config import RunConfig
from blackbox_sat.training.context import MINIBATCH, TrainContext
from blackbox_sat.training.objectives import DeviceObjective
from blackbox_sat.training.refine import SPSA_START_STEP, RefineConfig, refine

from .registry import MethodResult, register


@dataclass(frozen=True)
class SpsaConfig(RunConfig, RefineConfig):
    """``spsa``: refinement's options from ``theta0``, choosing between the tail average and the
    last iterate on validation accuracy, with a larger first step than refinement's."""

    select: Literal["average", "last", "val"] = "val"
    step: float = SPSA_START_STEP


@dataclass(frozen=True)
class NevergradConfig(RunConfig):
    """Initial step (fraction of the normalized range) and population (None: ``4 + floor(3 ln n)``)."""

    sigma0: float = 0.02
    popsize: int | None = None
    batch: int = MINIBATCH


def default_popsize(n: int) -> int:
    """CMA-ES's default population ``4 + floor(3 ln n)``."""
    return 4 + int(3 * math.log(max(n, 1)))


@register(
    "spsa",
    SpsaConfig,
    needs="device",
    summary="in-situ SPSA on the device from theta0 (Adam-normalised, pairs on one minibatch)",
)
def spsa(ctx: TrainContext) -> MethodResult:
    budget = ctx.device.remaining if ctx.device.remaining is not None else ctx.budget
    theta, history = refine(ctx, ctx.theta0, budget, config=ctx.config)
    return MethodResult(
        theta,
        {
            "refine": history.summary,
            "loss_trace": [round(h["loss"], 5) for h in history],
            "settings_trace": [h["settings_used"] for h in history],
        },
    )


# --------------------------------------------------------------------------------------
# nevergrad
# --------------------------------------------------------------------------------------
class _Space:
    """nevergrad parametrization of the normalized coordinates, and its inverse."""

    def __init__(self, obj: DeviceObjective, u0: np.ndarray, sigma0: float, seed: int = 0):
        import nevergrad as ng

        info = obj.info
        low, high = info.low / obj.scale, info.high / obj.scale
        self.bounded = ~obj.periodic & np.isfinite(low) & np.isfinite(high)
        self.n = obj.n
        parts = {}
        if self.bounded.any():
            b = self.bounded
            parts["b"] = (
                ng.p.Array(init=u0[b]).set_mutation(sigma=sigma0).set_bounds(low[b], high[b])
            )
        if (~self.bounded).any():
            parts["f"] = ng.p.Array(init=u0[~self.bounded]).set_mutation(sigma=sigma0)
        self.param = ng.p.Dict(**parts) if len(parts) > 1 else next(iter(parts.values()))
        self.param.function.deterministic = False
        # seeded: a run re-executes identically, which resume (ledger replay) relies on
        self.param.random_state = np.random.RandomState(
            np.random.SeedSequence([int(seed), 0x6E67]).generate_state(1)[0]
        )
        self.fully_bounded = bool(self.bounded.all())

    def to_u(self, value) -> np.ndarray:
        """Normalized coordinates ``(n,)`` of a parametrization value (array or dict)."""
        if not isinstance(value, dict):
            return np.asarray(value, float).copy()
        u = np.empty(self.n)
        if "b" in value:
            u[self.bounded] = value["b"]
        if "f" in value:
            u[~self.bounded] = value["f"]
        return u

    def from_standardized(self, data: np.ndarray) -> np.ndarray:
        child = self.param.spawn_child()
        child.set_standardized_data(np.asarray(data, float))
        return self.to_u(child.value)


def _make_optimizer(kind: str, space: _Space, budget: int, popsize: int, sigma0: float):
    import nevergrad as ng

    if kind == "cma":
        # nevergrad multiplies the scale by 0.3 (n < 18) or 0.15 for a fully bounded space;
        # undo it so that the initial step is exactly sigma0 normalized units.
        mult = (
            (0.3 if space.n < 18 else 0.15)
            if ng.p.helpers.Normalizer(space.param).fully_bounded
            else 1.0
        )
        conf = ng.optimizers.ParametrizedCMA(
            elitist=False,
            diagonal=False,
            popsize=popsize,
            scale=1.0 / mult,
            inopts={
                "tolfun": 0,
                "tolfunhist": 0,
                "tolx": 0,
                "tolstagnation": int(1e9),
                "tolflatfitness": int(1e9),
            },
        )
        return conf(space.param, budget=budget)
    if kind == "tbpsa":
        return ng.optimizers.ParametrizedTBPSA(naive=False, initial_popsize=popsize)(
            space.param, budget=budget
        )
    if kind == "ngopt":
        return ng.optimizers.NGOpt(space.param, budget=budget)
    raise ValueError(kind)


def _generation_size(kind: str, optimizer, popsize: int) -> int:
    if kind == "cma":
        return optimizer.es.popsize
    if kind == "tbpsa":
        return int(optimizer.popsize.llambda)
    return popsize


def _mean_u(kind: str, optimizer, space: _Space, u0: np.ndarray) -> np.ndarray:
    """The optimizer's recommendation in normalized units: the distribution mean for CMA
    and TBPSA, nevergrad's own recommendation for NGOpt."""
    if kind == "cma":  # ``es`` starts at the standardized origin, which is u0
        return space.from_standardized(optimizer.es.mean)
    return space.to_u(optimizer.provide_recommendation().value)


def run_nevergrad(ctx: TrainContext, kind: str) -> MethodResult:
    """Ask/tell loop of one nevergrad optimizer on the device (module docstring)."""
    cfg = ctx.config
    obj = DeviceObjective(ctx, purpose="train")
    dev = ctx.device
    ev = obj.cost(cfg.batch)
    budget = (dev.remaining if dev.remaining is not None else ctx.budget) // ev
    u0 = obj.keep(obj.to_u(ctx.theta0))
    sigma0 = cfg.sigma0
    popsize = cfg.popsize or default_popsize(obj.n)
    extra = {
        "optimizer": None,
        "popsize": popsize,
        "sigma0": sigma0,
        "generations": 0,
        "evaluations": 0,
        "recommendation": "mean" if kind in ("cma", "tbpsa") else "nevergrad pessimistic best",
        "budget_exhausted": False,
    }
    if budget < 1:
        return MethodResult(obj.to_theta(u0), extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nevergrad's sigma/bounds advice and runtime chatter
        space = _Space(obj, u0, sigma0, ctx.seed)
        optimizer = _make_optimizer(kind, space, budget, popsize, sigma0)
        if kind == "ngopt":  # the optimizer NGOpt chose (made now rather than at the first ask)
            extra["optimizer"] = optimizer.optim.name
        elif kind == "cma":
            extra["optimizer"] = (
                f"ParametrizedCMA(elitist=False, diagonal=False, popsize={popsize})"
            )
        else:
            extra["optimizer"] = f"ParametrizedTBPSA(naive=False, initial_popsize={popsize})"
        batches = ctx.minibatches(cfg.batch)
        loss_trace, first_es, restarts = [], None, 0
        try:
            while True:
                n_gen = min(
                    _generation_size(kind, optimizer, popsize), budget - extra["evaluations"]
                )
                if dev.remaining is not None:
                    n_gen = min(n_gen, dev.remaining // ev)
                if n_gen < 1:
                    break
                idx = next(batches)
                cands = [optimizer.ask() for _ in range(n_gen)]
                losses = []
                for cand in cands:
                    loss = obj.loss_u(space.to_u(cand.value), idx)
                    losses.append(loss)
                    optimizer.tell(cand, loss)
                    extra["evaluations"] += 1
                extra["generations"] += 1
                loss_trace.append(round(float(np.mean(losses)), 5))
                if kind == "cma":  # nevergrad replaces ``es`` when pycma stops: a restart
                    first_es = first_es or optimizer.es
                    restarts += optimizer.es is not first_es
                    first_es = optimizer.es
                ctx.snapshot(obj.to_theta(_mean_u(kind, optimizer, space, u0)))
        except BudgetExhausted:
            extra["budget_exhausted"] = True
        u = _mean_u(kind, optimizer, space, u0)
    if kind == "cma":
        extra["final_sigma"] = float(optimizer.es.sigma) * sigma0
        extra["restarts"] = int(restarts)
    if kind == "tbpsa":
        extra["final_mu"] = int(optimizer.popsize.mu)
        extra["final_sigma"] = float(optimizer.sigma) * sigma0
    extra["loss_trace"] = loss_trace
    return MethodResult(obj.to_theta(u), extra)


@register(
    "ng-cma",
    NevergradConfig,
    needs="device",
    summary="nevergrad non-elitist full CMA-ES on the device, recommending the distribution mean",
)
def ng_cma(ctx: TrainContext) -> MethodResult:
    return run_nevergrad(ctx, "cma")


@register(
    "ng-ngopt",
    NevergradConfig,
    needs="device",
    summary="nevergrad NGOpt on the device, declared noisy (it picks its own optimizer)",
)
def ng_ngopt(ctx: TrainContext) -> MethodResult:
    return run_nevergrad(ctx, "ngopt")


@register(
    "ng-tbpsa",
    NevergradConfig,
    needs="device",
    summary="nevergrad TBPSA on the device (noise-robust ES, recommends the population mean)",
)
def ng_tbpsa(ctx: TrainContext) -> MethodResult:
    return run_nevergrad(ctx, "tbpsa")
