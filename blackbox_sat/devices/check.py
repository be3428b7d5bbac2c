"""``check-device``: validate a user's adapter against the contract before training on it."""

from __future__ import annotations

import time

import numpy as np

from .contract import describe
from .metered import MeteredDevice
from .scale import measure_scale


def check_device(device, repeats: int = 5, batch: int = 16, seed: int = 0) -> dict:
    """Read the members, time one query and estimate the read noise from repeats.

    Makes ``repeats + 1`` calls of ``device.query`` at the starting setting, and those of
    :func:`.scale.measure_scale` for a device with unbounded parameters. Returns a
    report dict; raises a contract error naming the first broken member.
    """
    info = describe(device)
    meter = MeteredDevice(device, ledger=None, budget=None, replay=False)
    rng = np.random.default_rng(seed)
    x = rng.uniform(info.input_low, info.input_high, (batch, info.in_dim))
    theta = info.start(seed)
    t0 = time.perf_counter()
    meter.query(theta, x, purpose="probe")
    one_query_s = time.perf_counter() - t0
    ys = np.stack([meter.query(theta, x, purpose="probe") for _ in range(repeats)])
    noise = float(ys.std(axis=0, ddof=1).mean()) if repeats > 1 else None
    spread = float(ys.mean(axis=0).std())
    free = ~(np.isfinite(info.low) & np.isfinite(info.high))
    measured = (
        measure_scale(lambda t: meter.query(t, x, purpose="probe"), theta, free, seed)
        if free.any()
        else None
    )
    return {
        "n_params": info.n_params,
        "in_dim": info.in_dim,
        "out_dim": info.out_dim,
        "bounds": None if not info.has_bounds else [float(info.low.min()), float(info.high.max())],
        "periodic": int(info.periodic.sum()),
        "input_bounds": [float(info.input_low.min()), float(info.input_high.max())],
        "max_batch": info.max_batch,
        "theta0_given": info.theta0 is not None,
        "query_s": one_query_s,
        "batch": batch,
        "settings_used": meter.settings_used,
        "noise_std": noise,
        "output_spread": spread,
        "snr": None if not noise else spread / noise,
        # the unit of normalized steps: bound widths, or measured where there are no bounds
        "scale": "bound widths" if measured is None else measured["scale"],
    }
