"""The pipeline's initial design and its probes: which settings to measure, around where.

- :func:`design_split`: how the design's share divides into an SPSA walk and a box;
- :func:`spsa_walk`: the walk, the ``spsa`` method's first settings from ``theta0``;
- :func:`measure_design`: settings in a box around a centre, each on its own inputs, kept
  as surrogate data (the design's box, and the probes after each surrogate round).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import TrainContext
from .refine import A_FRACTION, SPSA_START_STEP, RefineConfig, refine
from .surrogate_choice import Dataset


def measure_design(
    ctx: TrainContext,
    data: Dataset,
    center: np.ndarray,
    radius: float,
    n: int,
    cfg: Any,
    seed: int,
) -> None:
    """Measure ``n`` designed settings around ``center`` (purpose ``probe``) into ``data``."""
    info = ctx.info
    n = min(n, ctx.settings_left() or n)
    if n <= 0:
        return
    from surrogates.design import design_settings, inputs_per_setting

    # a parameter without bounds gets a box one scale wide around the centre (radius <= 0.5),
    # so that the design's radius is in the same units as for a bounded one
    low = np.where(np.isfinite(info.low), info.low, center - info.scale / 2)
    high = np.where(np.isfinite(info.high), info.high, center + info.scale / 2)
    settings = design_settings(
        center,
        radius,
        n,
        low,
        high,
        global_fraction=cfg.global_fraction,
        periodic=info.periodic,
        seed=seed,
        spread=cfg.spread,
    )
    points: Any = getattr(settings, "settings", settings)  # a design object or its array
    pool = ctx.device_inputs(ctx.f_train)
    xs = inputs_per_setting(pool, len(points), min(cfg.inputs_per_setting, len(pool)), ctx.rng)
    for s, x in zip(points, xs):
        s = info.project(s)
        data.add(s, x, ctx.device.query(s, x, purpose="probe"))
        ctx.snapshot(center)  # the centre is the current training point


#: Settings per parameter of the initial design's box: ``mrr`` (160 currents) measured better
#: with a design of 2.5 n_params than 1.25 n_params (docs/experiments.md, "Initial design
#: fraction"); a larger share of the budget is walked by SPSA first (:func:`..pipeline.initial_fit`).
DESIGN_PER_PARAM = 2.5


def design_split(cfg: Any, budget: int, n_params: int) -> tuple[int, int]:
    """``(walk, box)``: the initial design's settings walked by SPSA, then measured in the box."""
    n = int(cfg.init_fraction * budget)
    box = min(n, max(1, int(np.ceil(DESIGN_PER_PARAM * n_params))))
    return n - box, box


def spsa_walk(ctx: TrainContext, n: int) -> np.ndarray:
    """The first ``n`` settings of the ``spsa`` method's run from ``theta0`` (its gains
    planned over the whole budget; the tail average returned, no validation settings)."""
    opt = RefineConfig(
        rule="spsa", step=SPSA_START_STEP, select="average", A=A_FRACTION * ctx.budget / 2
    )
    theta, _ = refine(ctx, ctx.theta0, n, config=opt)
    return theta
