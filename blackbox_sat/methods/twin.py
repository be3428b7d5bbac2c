"""Calibrated digital twins: identify the chip's errors from a few settings, then train on them.

| method | what it is |
|---|---|
| ``twin`` | calibrate, train on the calibrated model with exact gradients (``oracle``'s protocol on the twin), deploy |
| ``twin-sat`` | calibrate; SAT on the twin in silico (kept where it costs no resolvable validation accuracy); physics-aware SAT on the device with the twin as backward pass, recalibrating on what those steps measured; zeroth-order refinement |
| ``dat`` | the datasheet model plus a learned neural residual, fitted in the loop to measured outputs (DAT, Zheng et al. 2023) |

The model comes from ``--set model=package.module:function`` or the device's
``calibration_model()`` (:mod:`blackbox_sat.training.calibrate`, which also holds the query
design and its rules). ``train --init-from DIR`` hands the method another run's theta as
``theta0`` and its ``calibration.pt`` as ``ctx.init_calibration``: the twin methods then
refit it warm on the new settings and also fit from the datasheet, and keep the one with the
lower error on those settings (warm wins on the same chip after drift, the datasheet can win
on a new chip, whose errors are as far from the old chip's as from the datasheet). Each run
saves its calibration as ``calibration.pt``.

Budget rule of ``twin-sat`` (any model; fractions of the budget ``B``):

- calibration: the design's settings (``calibration_settings``: ~20 values per unknown, at
  least 10, at most 20 % of ``B``; doubled while every restart stalls, see :func:`calibrate`);
- refinement: the last ``refine_fraction`` = 15 % of ``B`` (the black-box pipeline's
  measured share), ``sa-spsa`` at its defaults;
- the rest: physics-aware SAT steps, split into ``recalibrations`` equal blocks, each
  followed by a warm recalibration on the design and the last ``REFIT_WINDOW`` settings,
  so the backward pass of the next block, and the saved twin, use the chip's outputs near
  the working point (``dat`` refits its residual on the same window).

Device steps fine-tune a point already trained in silico, so their Adam rate is
``device_lr_factor`` (0.1) times the rate the in-silico search chose, cosine-decayed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from blackbox_sat.devices.metered import BudgetExhausted
from blackbox_sat.training.calibrate import (
    MAX_FRACTION,
    REFIT_WINDOW,
    Rows,
    calibration_settings,
    check_calibration_model,
    fit_twin,
    load_twin,
    measure_design,
    resolve_calibration_model,
    twin_report,
)
from blackbox_sat.training.context import MINIBATCH, TrainContext
from blackbox_sat.training.physics_aware import Anchors, device_step
from blackbox_sat.training.refine import RefineConfig, refine

from .model_based import ModelTrainingConfig, train_on_models
from .registry import MethodResult, register


@dataclass(frozen=True)
class TwinConfig(ModelTrainingConfig):
    """``twin``: calibration options, then ``oracle``'s training protocol on the twin."""

    model: str = "device"  # "device" (its calibration_model()) or package.module:function
    settings: int = 0  # calibration settings; 0: the design rule (training/calibrate.py)
    residual: bool = False  # calibrated+residual: a learned output correction as well
    residual_form: str = "monotone"  # the correction: "monotone" per output, or "mlp" on [y, x]
    max_iter: int = 400  # L-BFGS iterations per calibration attempt


@dataclass(frozen=True)
class TwinSatConfig(TwinConfig):
    rho: float = 0.05  # SAT radius, normalized L2, in silico and on the device
    adaptive: bool = False  # ASAM: the perturbation scaled by |theta|, in silico and on the device
    device_lr_factor: float = 0.1  # device steps' Adam rate / the in-silico rate chosen
    inner_steps: int = 3  # anchored steps per device setting (physics_aware.Anchors)
    recalibrations: int = 2  # blocks of device steps, each followed by a recalibration
    refine_fraction: float = 0.15
    refine: RefineConfig = field(default_factory=lambda: RefineConfig(rule="sa-spsa"))


@dataclass(frozen=True)
class DatConfig(ModelTrainingConfig):
    model: str = "device"  # whose datasheet values start the residual model
    rounds: int = 4  # alternations of device steps and residual fits
    lr: float = 0.01  # device steps' Adam rate (insitu-sat's), cosine-decayed
    inner_steps: int = 3
    residual_steps: int = 1500  # Adam steps of each residual fit


#: A doubling of the calibration settings must bring the held-out error below this fraction
#: of the previous fit's for another doubling to be tried.
ESCALATION_GAIN = 0.75


def _left(ctx: TrainContext) -> int:
    """Settings left (the run's budget where the device is not metered by one)."""
    left = ctx.device.remaining
    return ctx.budget - ctx.device.settings_used if left is None else left


def _model(ctx: TrainContext, spec: str):
    model = resolve_calibration_model(ctx.source, spec)
    x = ctx.device_inputs(ctx.f_train[:4])
    check_calibration_model(model, ctx.info, x, ctx.theta0)
    return model


def calibrate(ctx: TrainContext, cfg: TwinConfig, rows: Rows):
    """Measure the design into ``rows`` and fit; warm from ``ctx.init_calibration`` if given.
    When every attempt of a fit from the datasheet stalls (a local minimum: large errors make
    the landscape rougher, and more settings smooth it), measure as many settings again and
    refit, while the design's budget cap allows and each doubling cuts the held-out error
    by a quarter. Returns the fitted
    :class:`~surrogates.CalibratedSurrogate` (``report["escalations"]``: each earlier fit)."""
    model = _model(ctx, cfg.model)
    n_unknowns = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cap = calibration_settings(n_unknowns, ctx.info.out_dim, MINIBATCH, _left(ctx))
    n = cfg.settings or cap
    cap = cfg.settings or max(cap, int(MAX_FRACTION * _left(ctx)))  # a given count is kept
    measure_design(ctx, min(n, _left(ctx)), rows)

    def from_datasheet():
        return fit_twin(
            copy.deepcopy(model),
            rows,
            ctx.seed,
            residual=cfg.residual,
            residual_form=cfg.residual_form,
            max_iter=cfg.max_iter,
        )

    if ctx.init_calibration:  # the same chip drifted, or a new one: keep what fits better
        warm = load_twin(ctx.init_calibration, copy.deepcopy(model))
        warm.update(*rows.arrays(), steps=cfg.max_iter)
        fresh = from_datasheet()
        errors = (warm.report["updates"][-1]["train_nrmse"], fresh.report["final_train_nrmse"])
        sur = warm if errors[0] <= errors[1] else fresh
        # settings: the recalibration's (the rest of a warm report is the old fit's)
        sur.report["init"] = {
            "settings": len(rows),
            "warm_nrmse": errors[0],
            "datasheet_nrmse": errors[1],
        }
        sur.report["init"]["kept"] = "warm" if sur is warm else "datasheet"
        return sur
    escalations: list[dict] = []
    while True:
        sur = from_datasheet()
        stalled = all(a["stalled"] for a in sur.report["attempts"])
        more = min(len(rows), cap - len(rows), _left(ctx))
        # A doubling that did not cut the held-out error by a quarter points to an error the
        # model cannot express (model form), which more settings will not fix.
        gained = (
            not escalations
            or sur.report["heldout_nrmse"] < ESCALATION_GAIN * escalations[-1]["heldout_nrmse"]
        )
        if not stalled or more <= 0 or not gained:
            break
        escalations.append({"settings": len(rows), "heldout_nrmse": sur.report["heldout_nrmse"]})
        measure_design(ctx, more, rows)
    sur.report["escalations"] = escalations
    return sur


def _saver(sur):
    return {"calibration.pt": sur.save}


@register(
    "twin",
    TwinConfig,
    needs="approximate",
    summary="calibrate a physical model from a few settings, train on it with exact gradients",
)
def twin(ctx: TrainContext) -> MethodResult:
    rows = Rows()
    sur = calibrate(ctx, ctx.config, rows)
    res = train_on_models(ctx, [sur.predict_setting], [sur.predict_setting], label="twin")
    res.extra["calibration"] = twin_report(sur, ctx.source)
    res.files = _saver(sur)
    return res


def in_silico_sat(ctx: TrainContext, model, cfg: TwinSatConfig) -> tuple[MethodResult, float]:
    """SAT on the twin, kept unless plain training on it validates better by more than the
    validation accuracy's standard error ``sqrt(p (1 - p) / n_val)`` (flatness is worth a
    difference the validation set cannot resolve, not more). The plain run starts from the
    digital layers the SAT run trained (a hybrid PNN): from the identity start instead, it
    wins on the N=32 hybrid mesh, the device steps then run without SAT, and transfer falls
    (docs/calibration.md, "The in-silico rule"). Costs no setting. Returns the result and
    the radius the device steps use (``rho`` or 0)."""
    rho = cfg.rho
    sat = train_on_models(ctx, [model], [model], rho=rho, adaptive=cfg.adaptive, label="twin-sat")
    sat_digital = copy.deepcopy(ctx.pnn.state_dict())
    plain = train_on_models(ctx, [model], [model], label="twin-sat plain")
    p = plain.extra["model_val_accuracy"]
    tolerance = float(np.sqrt(p * (1 - p) / len(ctx.y_val)))
    keep_sat = sat.extra["model_val_accuracy"] >= p - tolerance
    chosen = sat if keep_sat else plain
    if keep_sat:
        ctx.pnn.load_state_dict(sat_digital)
    chosen.extra["in_silico"] = {
        "rho": rho if keep_sat else 0.0,
        "sat_val": sat.extra["model_val_accuracy"],
        "plain_val": p,
        "tolerance": tolerance,
    }
    return chosen, (rho if keep_sat else 0.0)


def device_steps(
    ctx: TrainContext,
    theta: np.ndarray,
    stand_in,
    n_settings: int,
    lr: float,
    rho: float,
    inner_steps: int,
    rows: Rows,
    blocks: int,
    after_block,
    adaptive: bool = False,
) -> tuple[np.ndarray, list[float]]:
    """Physics-aware (SAT) steps on the device for ``n_settings`` settings, the backward pass
    through ``stand_in()`` (re-read each block), every measurement added to ``rows``;
    ``after_block()`` runs after each of ``blocks`` equal blocks. Returns (theta, losses)."""
    info = ctx.info
    u = torch.tensor(theta / info.scale, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    if ctx.pnn.trainable:
        opt.add_param_group({"params": list(ctx.pnn.parameters()), "lr": 0.01})
    n_settings = max(0, min(n_settings, _left(ctx)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(n_settings, 1), eta_min=lr * 0.1)
    batches, losses = ctx.minibatches(), []
    anchors = Anchors(len(ctx.y_train), info.out_dim)
    per_block = int(np.ceil(n_settings / max(blocks, 1)))
    done = 0
    try:
        while done < n_settings:
            model = stand_in()
            for _ in range(min(per_block, n_settings - done)):
                opt.zero_grad()
                idx = next(batches)
                before = theta
                theta, step = device_step(
                    ctx, theta, idx, model, opt, u, anchors, batches, inner_steps,
                    rho=rho, adaptive=adaptive,
                )  # fmt: skip
                assert step.x is not None and step.y is not None  # a device step measures
                rows.add(before, step.x, step.y)
                sched.step()
                losses.append(step.loss)
                done += step.settings
                ctx.snapshot(theta)
            after_block()
            anchors.invalidate()
    except BudgetExhausted:
        pass
    return theta, losses


@register(
    "twin-sat",
    TwinSatConfig,
    needs="approximate",
    summary="calibrate, SAT on the twin in silico, physics-aware SAT on the device with recalibration, ZO refinement",
)
def twin_sat(ctx: TrainContext) -> MethodResult:
    cfg = ctx.config
    rows = Rows()
    sur = calibrate(ctx, cfg, rows)
    cal = twin_report(sur, ctx.source)
    res, rho = in_silico_sat(ctx, sur.predict_setting, cfg)
    n_refine = round(cfg.refine_fraction * ctx.budget)
    updates: list[float] = []

    n_design = len(rows)

    def recalibrate():
        sur.update(*rows.window(REFIT_WINDOW, keep_first=n_design).arrays())
        updates.append(sur.report["updates"][-1]["train_nrmse"])

    theta, losses = device_steps(
        ctx,
        res.theta,
        lambda: sur.predict_setting,
        _left(ctx) - n_refine,
        cfg.device_lr_factor * res.extra["chosen_lr"],
        rho,
        cfg.inner_steps,
        rows,
        cfg.recalibrations,
        recalibrate,
        adaptive=cfg.adaptive,
    )
    history = None
    if _left(ctx) > 0:
        theta, history = refine(ctx, theta, _left(ctx), config=cfg.refine)
    res.theta = theta
    res.extra.update(
        calibration=cal,
        recalibration_train_nrmse=updates,
        device_steps=len(losses),
        device_final_loss=float(np.mean(losses[-20:])) if losses else None,
        refine=None if history is None else history.summary,
    )
    res.files = _saver(sur)
    return res


@register(
    "dat",
    DatConfig,
    needs="approximate",
    summary="datasheet model plus a neural residual fitted in the loop (DAT)",
)
def dat(ctx: TrainContext) -> MethodResult:
    """In silico on the datasheet model first, then ``rounds`` alternations: physics-aware
    steps with the datasheet plus residual as the backward pass, then a fresh residual fit on
    the last ``REFIT_WINDOW`` settings' outputs. The model's parameters stay at their datasheet values."""
    cfg = ctx.config
    model = _model(ctx, cfg.model)
    res = train_on_models(ctx, [model], [model], label="dat")
    rows = Rows()
    current = {"stand_in": model, "fits": []}

    def fit_residual():
        if _left(ctx) <= 0:  # the last block: no step would use this fit
            return
        sur = fit_twin(
            model,
            rows.window(REFIT_WINDOW),
            ctx.seed,
            residual=True,
            residual_form="mlp",  # DAT's network on [y, x]
            max_iter=0,  # the datasheet stays: only the residual learns
            max_restarts=0,
            residual_joint=False,
            refit_all=False,
            loss="mse",
            residual_steps=cfg.residual_steps,
        )
        current["stand_in"] = sur.predict_setting
        current["fits"].append(sur.report["residual"])

    theta, losses = device_steps(
        ctx,
        res.theta,
        lambda: current["stand_in"],
        _left(ctx),
        cfg.lr,
        0.0,
        cfg.inner_steps,
        rows,
        cfg.rounds,
        fit_residual,
    )
    res.theta = theta
    res.extra.update(
        residual_fits=current["fits"],
        device_steps=len(losses),
        device_final_loss=float(np.mean(losses[-20:])) if losses else None,
    )
    return res
