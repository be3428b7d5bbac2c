"""Zeroth-order refinement on the device.

Every loss value here is a measurement: one setting programmed on the device through
``ctx.device.query`` (so it is counted, charged and logged), ``ctx.f_train[idx]`` (at most
:data:`~blackbox_sat.training.context.MINIBATCH` inputs) measured, and the cross-entropy of the
PNN's logits against the labels computed on the host. :class:`DeviceObjective` wraps that.

All step sizes live in **normalized coordinates** ``u = theta / info.scale`` (each
parameter divided by its bound width; docs/design.md "Units"), so the defaults below are rules
that hold for any device, not numbers tuned to a simulator. Iterates are kept *unwrapped*
for periodic parameters (so averages are meaningful across the wrap) and clipped for the
others; every setting sent to the device goes through ``info.project`` (wrap or clip).

Rules (``refine(ctx, theta, n_settings, rule=...)``)
----------------------------------------------------
``spsa`` (Spall 1998): a two-sided simultaneous perturbation ``u +- c_k d``, ``d`` Rademacher
(+-1 per coordinate), both settings measured on **one** minibatch (common random numbers),
``g = (L+ - L-) / (2 c_k) * d``, ``u <- u - a_k g``, with Spall's gains
``a_k = a / (k + 1 + A)^alpha`` and ``c_k = c / (k + 1)^gamma`` (``alpha = 0.602``,
``gamma = 0.101``, ``A = 10 %`` of the planned steps).

``rdsa``: random-direction estimates, the same formula with ``d`` Gaussian
(``directions="gaussian"``) or uniform on the sphere of radius ``sqrt(n)``
(``directions="sphere"``), so every rule has ``E[d d^T] = I`` and the same step-size units.

``sa-spsa``: sharpness-aware ZO. Each pair is measured around ``u + xi`` with ``||xi||_2 =
rho`` exactly (normalized L2, SAT's unit), both members of the pair sharing ``xi``. So the
step is an unbiased estimate of the gradient of the loss *under perturbations of radius
rho* and refinement prefers the flat region SAT found instead of sliding into a sharp
minimum nearby. ``sa="random"`` (default): ``xi`` uniform on the sphere of radius rho
(randomised smoothing, ``E L(u + xi) ~ L(u) + rho^2 / (2n) tr H``). ``sa="ascent"``: the
SAM-like ``xi = rho m / ||m||``, ``m`` an exponential average (0.9) of past gradient
estimates (the first step, with no estimate yet, falls back to random). ``rho`` defaults to
SAT's default, 0.05. Random is the default (it also measured better) because a ZO
gradient estimate in ``n`` dimensions has cosine ~``1/sqrt(n)`` with the true gradient, so
the "ascent" direction is mostly noise anyway, and what it adds is a *bias* of unknown
sign; the random version minimises a well-defined objective.

``guided`` (the refinement of ``guided-es``; ``blackbox-sat`` refines with ``sa-spsa``,
``blackbox`` with ``spsa``): guided ES (:mod:`.guided`, Maheswaranathan et al. 2019):
Gaussian directions stretched along the span of the surrogate's last ``guide_k``
physics-aware gradients (``guide_alpha`` of the variance stays isotropic), antithetic pairs
on one minibatch; each pair's mean outputs give the next guide gradient at no setting.
With ``rho > 0`` the pair is measured around ``u + xi`` as in ``sa-spsa``. Without a
surrogate (``refine(..., surrogate=None)``) it is isotropic Gaussian search.

Shared options (all counted in settings, all in normalized units)
-----------------------------------------------------------------
- ``c`` (0.02): perturbation per coordinate, 2 % of the bound width: far above a 12-bit DAC
  step (0.025 %) and typical programming noise (~0.1 %), small against the range.
- ``step`` (0.002; the ``spsa`` method, which starts from ``theta0``, uses 0.015): the size
  of the first step per coordinate (RMS); later steps follow Spall's decay
  ``a_k / a_0 = ((1 + A) / (k + 1 + A))^alpha``. Refinement starts from a trained point,
  where large steps undo training (table below), hence the small default.
- ``normalize="adam"`` (default): Adam-style normalisation of the ZO gradient
  (``m / sqrt(v)``, betas 0.9 / 0.999, bias-corrected), so ``a_k`` *is* the per-coordinate
  step and no settings are spent on calibration. ``normalize=None``: plain SPSA with
  **gain calibration** (``a=None``): before stepping, ``calibration`` (4) gradient estimates
  at the start point (each of a step's form, ``resamples`` pairs averaged), on training
  minibatches, give the RMS of a step's estimate, and ``a`` is set so that the first step
  moves ``step`` per coordinate RMS (``a_0 * RMS(g) = step``); costs ``2 * resamples *
  calibration`` settings. A number for ``a`` skips calibration.
- **Resampling** ``resamples`` (1): average that many independent direction pairs per step
  (all on the step's minibatch). For ``rdsa`` this is "k directions per step".
- **Blocking** ``blocking`` (False): after computing the move, measure the loss at the new
  point on the *same* minibatch (**one extra setting per step**) and reject the move if it
  exceeds the reference (the mean of the step's pair losses, an ``O(c^2)`` estimate of the
  loss at ``u``, free) by more than ``block_tol`` (0.0 nats).
- ``average`` (0.25): Polyak-Ruppert average of the iterates over the last quarter of the
  steps. ``select`` picks the returned point: ``"average"`` (default), ``"last"``, or
  ``"val"``: measure validation accuracy of both on the device (``purpose="train"``,
  charged, ``ceil(n_val / 128)`` settings each, reserved from ``n_settings`` up front) and
  keep the better one (ties go to the average). Never the test set.

Why these defaults (the tables are in docs/experiments.md, "Refinement rules"): from
``theta0``, Adam normalisation with first step 0.015 had the best mean validation accuracy
over ``mzi``, ``mrr`` and ``freespace`` (hence the ``spsa`` method's step); at this budget
more steps beat better steps, so blocking and resampling are off; ``sa-spsa``'s random
centre measured better than "ascent". From a trained point large steps undo training
(``mrr`` oracle: 0.89 -> 0.65 at step 0.015, 0.86 at 0.002), and plain SPSA with gain
calibration is unsafe there (a near-optimum measures a tiny gradient, so the gain comes out
large): hence refinement's Adam-normalised step 0.002.

``refine`` never spends more than ``n_settings`` (nor more than ``ctx.device.remaining``):
the number of steps is planned from the per-step cost, every step checks affordability
first, and a :class:`~blackbox_sat.devices.metered.BudgetExhausted` from the device (another
user of the budget) ends refinement with the current point. ``ctx.snapshot`` is called
after every step with the point refine would return at that moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from blackbox_sat.devices.metered import BudgetExhausted

from .config import build
from .context import MINIBATCH, TrainContext
from .guided import Guide, guide_gradient
from .objectives import DeviceObjective

RULES = ("spsa", "rdsa", "sa-spsa", "guided")
DIRECTIONS = ("rademacher", "gaussian", "sphere")
#: Spall's asymptotically optimal practical exponents.
ALPHA, GAMMA = 0.602, 0.101
#: Stability constant ``A`` as a fraction of the planned number of steps (Spall).
A_FRACTION = 0.1
#: First step (normalized, per coordinate) of SPSA from ``theta0``: the ``spsa`` method, and
#: the pipeline's SPSA without a surrogate or before its design's box (module docstring).
SPSA_START_STEP = 0.015


@dataclass(frozen=True)
class RefineConfig:
    """Every option of :func:`refine` (normalized units; module docstring)."""

    rule: Literal["spsa", "rdsa", "sa-spsa", "guided"] = "spsa"
    c: float = 0.02  # perturbation per coordinate (fraction of bound width)
    step: float = 0.002  # first-step size per coordinate (RMS), normalized
    a: float | None = None  # None: gain calibration; a number: fixed a
    calibration: int = 4  # gradient estimates spent on gain calibration
    resamples: int = 1  # direction pairs averaged per step (rdsa: k directions)
    directions: Literal["rademacher", "gaussian", "sphere"] | None = (
        None  # None: gaussian for rdsa, else rademacher
    )
    blocking: bool = False
    block_tol: float = 0.0  # nats
    normalize: Literal["adam", "none"] | None = (
        "adam"  # Adam-normalised steps, or plain SPSA with gain calibration
    )
    rho: float = 0.05  # sa-spsa radius, normalized L2 (SAT's default rho)
    sa: Literal["random", "ascent"] = "random"
    alpha: float = ALPHA
    gamma: float = GAMMA
    A: float | None = None  # None: A_FRACTION of the planned steps
    average: float = 0.25  # fraction of steps averaged at the end (0: none)
    select: Literal["average", "last", "val"] = "average"
    batch: int = MINIBATCH
    purpose: str = "refine"
    guide_k: int = 4  # guided: surrogate gradients spanning the guide subspace
    guide_alpha: float = 0.5  # guided: share of the search variance that stays isotropic

    def __post_init__(self) -> None:
        if not (
            self.c > 0
            and self.step > 0
            and self.resamples >= 1
            and 0 <= self.average < 1
            and self.rho >= 0
            and self.calibration >= 1
            and 1 <= self.batch <= MINIBATCH
        ):
            raise ValueError(
                f"need c > 0, step > 0, resamples >= 1, 0 <= average < 1, rho >= 0, calibration >= 1, "
                f"1 <= batch <= {MINIBATCH}"
            )

    @property
    def direction_kind(self) -> str:
        return self.directions or ("gaussian" if self.rule == "rdsa" else "rademacher")

    @property
    def adam(self) -> bool:
        return self.normalize == "adam"


def sample_directions(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """One direction ``(n,)`` with ``E[d d^T] = I``: Rademacher, Gaussian or uniform on the
    sphere of radius ``sqrt(n)``."""
    if kind == "rademacher":
        return rng.choice(np.array([-1.0, 1.0]), n)
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "sphere":
        z = rng.standard_normal(n)
        return z * (math.sqrt(n) / max(float(np.linalg.norm(z)), 1e-300))
    raise ValueError(f"directions must be one of {DIRECTIONS}, got {kind!r}")


def sphere_point(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """Uniform on the L2 sphere of ``radius`` in ``n`` dimensions."""
    z = rng.standard_normal(n)
    return z * (radius / max(float(np.linalg.norm(z)), 1e-300))


def refine_options(rule: str = "spsa", **options: Any) -> RefineConfig:
    """A :class:`RefineConfig` from keyword options; an unknown or ill-typed one is an error."""
    return build(RefineConfig, {"rule": rule, **options}, what="refine option")


class _Estimator:
    """Two-sided ZO gradient estimates on one minibatch, with the rule's perturbation."""

    def __init__(
        self, obj: DeviceObjective, opt: RefineConfig, rng: np.random.Generator, surrogate=None
    ):
        self.obj, self.rule, self.opt, self.rng = obj, opt.rule, opt, rng
        self.momentum = None  # EMA of past estimates, for sa="ascent"
        self.surrogate = surrogate
        self.guide = Guide(obj.n, opt.guide_k, opt.guide_alpha) if opt.rule == "guided" else None

    def direction(self) -> np.ndarray:
        if self.guide is not None:
            return self.guide.direction(self.rng)
        return sample_directions(self.rng, self.opt.direction_kind, self.obj.n)

    def pair(self, u: np.ndarray, idx, ck: float, d: np.ndarray) -> tuple[float, float]:
        """The losses at ``u +- ck d``; for ``guided``, the pair's outputs also give the next
        guide gradient (their mean is the outputs at ``u``, to ``O(ck^2)``)."""
        if self.guide is None or self.surrogate is None:
            lp, lm = self.obj.losses_u([u + ck * d, u - ck * d], idx)
            return lp, lm
        (lp, yp), (lm, ym) = (
            self.obj.loss_outputs(self.obj.to_theta(v), idx) for v in (u + ck * d, u - ck * d)
        )
        theta = self.obj.to_theta(u)
        g = guide_gradient(
            self.obj.ctx, self.surrogate, theta, self.obj.inputs(idx), (yp + ym) / 2, idx
        )
        self.guide.add(g * self.obj.scale)  # normalized units
        return lp, lm

    def centre_offset(self) -> np.ndarray:
        n, rho = self.obj.n, self.opt.rho
        if self.rule not in ("sa-spsa", "guided") or rho == 0:
            return np.zeros(n)
        m = self.momentum
        if self.opt.sa == "ascent" and m is not None and np.linalg.norm(m) > 0:
            return rho * m / np.linalg.norm(m)
        return sphere_point(self.rng, n, rho)

    def __call__(self, u: np.ndarray, idx, ck: float):
        """``(g, mean_loss, offsets)``: averaged estimate over ``resamples`` pairs, the mean of
        all measured losses, and the perturbation centres used."""
        gs, ls, offs = [], [], []
        for _ in range(self.opt.resamples):
            d = self.direction()
            xi = self.centre_offset()
            lp, lm = self.pair(u + xi, idx, ck, d)
            gs.append((lp - lm) / (2 * ck) * d)
            ls += [lp, lm]
            offs.append(xi)
        g = np.mean(gs, axis=0)
        self.momentum = g if self.momentum is None else 0.9 * self.momentum + 0.1 * g
        return g, float(np.mean(ls)), offs


class RefineHistory(list):
    """One dict per step (``step``, ``settings_used`` (the device's running count),
    ``loss`` (mean of the step's measured losses), ``accepted``, ``a_k``, ``c_k``,
    ``step_rms``; ``new_loss`` with blocking; ``xi_norm`` for ``sa-spsa``), plus
    ``.summary``: a dict of the run (rule, planned and taken steps, rejections, ``a``, the
    calibration RMS, which point was returned and why, settings used)."""

    summary: dict


def refine(
    ctx: TrainContext,
    theta: np.ndarray,
    n_settings: int,
    rule: str = "spsa",
    config: RefineConfig | None = None,
    surrogate=None,
    **options: Any,
) -> tuple[np.ndarray, RefineHistory]:
    """Zeroth-order refinement of ``theta`` on ``ctx.device`` within ``n_settings`` settings.

    Returns ``(theta, history)``: the refined setting (device units, projected) and a
    :class:`RefineHistory` (a list of per-step dicts with ``settings_used`` and ``loss``,
    and ``history.summary``). Options: a :class:`RefineConfig` as ``config``, or its fields
    as keywords (module docstring). ``surrogate``: the guide of rule ``guided``.
    """
    opt = config if config is not None else refine_options(rule, **options)
    rule = opt.rule
    obj = DeviceObjective(ctx, purpose=opt.purpose)
    dev = ctx.device
    rng = np.random.default_rng([int(ctx.seed), 0x5B5A, RULES.index(rule)])
    batches = ctx.minibatches(opt.batch)
    start_used = dev.settings_used
    n_settings = int(n_settings)

    def left() -> int:
        mine = n_settings - (dev.settings_used - start_used)
        return mine if dev.remaining is None else min(mine, dev.remaining)

    ev = obj.cost(opt.batch)
    k_pairs = opt.resamples
    step_cost = (2 * k_pairs + (1 if opt.blocking else 0)) * ev
    calibrate = opt.a is None and not opt.adam
    cal_cost = 2 * k_pairs * opt.calibration * ev if calibrate else 0
    sel_cost = 2 * obj.accuracy_cost("val") if opt.select == "val" else 0
    n_steps = (left() - cal_cost - sel_cost) // step_cost
    u = obj.keep(obj.to_u(theta))
    history = RefineHistory()
    summary = history.summary = {
        "rule": rule,
        "planned_steps": int(max(n_steps, 0)),
        "steps": 0,
        "rejected": 0,
        "a": None,
        "settings_start": start_used,
    }
    if n_steps < 1:
        summary.update(settings_used=dev.settings_used, chosen="start")
        return obj.to_theta(u), history

    alpha, gamma = opt.alpha, opt.gamma
    big_a = A_FRACTION * n_steps if opt.A is None else opt.A
    c = opt.c
    est = _Estimator(obj, opt, rng, surrogate)
    avg_from = round((1 - opt.average) * n_steps) if opt.average > 0 else n_steps
    u_sum, n_avg = np.zeros_like(u), 0
    u_t = torch.zeros(len(u), dtype=torch.float64)
    adam = torch.optim.Adam([u_t], betas=(0.9, 0.999), eps=1e-12) if opt.adam else None

    def current() -> np.ndarray:  # the point refine would return now
        return u_sum / n_avg if (n_avg and opt.select != "last") else u

    try:
        # --- gain calibration: a_0 * RMS(step's estimate) = step -------------------------
        if calibrate:
            cal = []
            for _ in range(opt.calibration):
                g, _, _ = est(u, next(batches), c)
                cal.append(g)
            est.momentum = None
            # each calibration estimate has the form of a step's estimate (resamples averaged)
            rms = max(
                math.sqrt(float(np.mean(np.sum(np.asarray(cal) ** 2, axis=1)) / obj.n)), 1e-12
            )
            a = opt.step * (1 + big_a) ** alpha / rms
            summary["calibration_rms"] = rms
        elif opt.adam:
            a = opt.step * (1 + big_a) ** alpha if opt.a is None else opt.a
        else:
            a = opt.a
        summary["a"] = a

        for k in range(n_steps):
            if left() < step_cost + sel_cost or not dev.can_afford(step_cost):
                break
            idx = next(batches)
            ak, ck = a / (k + 1 + big_a) ** alpha, c / (k + 1) ** gamma
            g, ref_loss, offs = est(u, idx, ck)
            if (
                adam is not None
            ):  # Adam's normalised step with Spall's decaying gain a_k as its rate
                adam.param_groups[0]["lr"] = ak
                u_t.data = torch.from_numpy(u.copy())
                u_t.grad = torch.from_numpy(g)
                adam.step()
                move = u_t.detach().numpy() - u
            else:
                move = -ak * g
            u_new = obj.keep(u + move)
            entry = {
                "step": k,
                "loss": ref_loss,
                "a_k": ak,
                "c_k": ck,
                "step_rms": float(np.sqrt(np.mean((u_new - u) ** 2))),
            }
            accepted = True
            if opt.blocking:
                new_loss = obj.loss_u(u_new + offs[0], idx)
                accepted = new_loss <= ref_loss + opt.block_tol
                entry["new_loss"] = new_loss
            if accepted:
                u = u_new
            else:
                summary["rejected"] += 1
            if k >= avg_from:
                u_sum, n_avg = u_sum + u, n_avg + 1
            entry.update(accepted=accepted, settings_used=dev.settings_used)
            if rule in ("sa-spsa", "guided"):
                entry["xi_norm"] = float(np.mean([np.linalg.norm(o) for o in offs]))
            history.append(entry)
            summary["steps"] = k + 1
            ctx.snapshot(obj.to_theta(current()))
    except BudgetExhausted:
        summary["budget_exhausted"] = True

    chosen, out = "last", u
    if n_avg:
        chosen, out = "average", u_sum / n_avg
        if opt.select == "last":
            chosen, out = "last", u
        elif opt.select == "val" and left() >= sel_cost and dev.can_afford(sel_cost):
            try:
                acc_avg = obj.accuracy(obj.to_theta(u_sum / n_avg), "val", "train")
                acc_last = obj.accuracy(obj.to_theta(u), "val", "train")
                summary["val_accuracy"] = {"average": acc_avg, "last": acc_last}
                if acc_last > acc_avg:
                    chosen, out = "last", u
            except BudgetExhausted:
                summary["budget_exhausted"] = True
    summary.update(chosen=chosen, settings_used=dev.settings_used, averaged_steps=n_avg)
    return obj.to_theta(out), history
