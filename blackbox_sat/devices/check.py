"""``check-device``: validate a user's adapter against the contract before training on it."""

from __future__ import annotations

import time

import numpy as np

from .contract import describe
from .metered import MeteredDevice
from .scale import measure_scale

#: Below this signal-to-noise ratio the outputs' dependence on the inputs is within a few
#: read-noise standard deviations, so a surrogate fit is noise-limited (docs/experiments.md,
#: "Check-device on the built-in simulators", gives the built-ins' values for comparison).
LOW_SNR = 3.0


def check_device(device, repeats: int = 5, batch: int = 16, seed: int = 0) -> dict:
    """Read the members, time one query and estimate the read noise from repeats.

    Makes ``repeats + 1`` calls of ``device.query`` at the starting setting, and those of
    :func:`.scale.measure_scale` for a device with unbounded parameters. Returns a report
    dict whose ``warnings`` list what a run would assume or struggle with; raises a
    contract error naming the first broken member.
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
    snr = None if noise is None else (spread / noise if noise > 0 else float("inf"))
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
        "input_bounds_given": getattr(device, "input_bounds", None) is not None,
        "max_batch": info.max_batch,
        "theta0_given": info.theta0 is not None,
        "query_s": one_query_s,
        "batch": batch,
        "settings_used": meter.settings_used,
        "noise_std": noise,
        "output_spread": spread,
        "snr": snr,
        # the unit of normalized steps: bound widths, or measured where there are no bounds
        "scale": "bound widths" if measured is None else measured["scale"],
        "warnings": _warnings(device, info, snr),
    }


def _warnings(device, info, snr: float | None) -> list[str]:
    out = []
    if not info.has_bounds:
        out.append(
            "no `bounds`: runs measure a scale for the parameters instead (the step that moves the "
            "outputs by a set fraction of their spread; see `scale` above, `--set scale=` overrides)"
        )
    if getattr(device, "input_bounds", None) is None:
        out.append(
            "no `input_bounds`: inputs are encoded onto the default [-1, 1]; declare the range "
            "your modulators accept if it differs"
        )
    if snr is not None and snr < LOW_SNR:
        out.append(
            f"low snr {snr:.2g} (< {LOW_SNR:g}): the outputs barely depend on the inputs at "
            "theta0; raise the detector gain, integrate longer or average repeats inside query"
        )
    return out


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def format_report(report: dict) -> list[str]:
    """The report as aligned ``name: value (unit)`` lines, then one ``warning:`` line each."""
    r = report
    bounds = (
        "none declared (parameters unbounded)"
        if r["bounds"] is None
        else f"[{r['bounds'][0]:.4g}, {r['bounds'][1]:.4g}] (device units; min low, max high)"
    )
    ib = f"[{r['input_bounds'][0]:.4g}, {r['input_bounds'][1]:.4g}]" + (
        "" if r["input_bounds_given"] else " (assumed: the device declares none)"
    )
    snr = r["snr"]
    rows = {
        "n_params": r["n_params"],
        "in_dim": r["in_dim"],
        "out_dim": r["out_dim"],
        "bounds": bounds,
        "scale": r["scale"]
        if isinstance(r["scale"], str)
        else f"{r['scale']:.4g} (device units per normalized unit, measured: no bounds)",
        "periodic": f"{r['periodic']} of {r['n_params']} parameters",
        "input_bounds": ib,
        "max_batch": r["max_batch"] or "none (any batch in one call)",
        "theta0": "given"
        if r["theta0_given"]
        else "default: "
        + ("bounds' midpoint" if r["bounds"] else "0")
        + " + a seeded jitter of 1 % of each bound width (1 where unbounded)",
        "query_s": f"{_seconds(r['query_s'])} per query of {r['batch']} inputs",
        "noise_std": "n/a (needs --repeats >= 2)"
        if r["noise_std"] is None
        else f"{r['noise_std']:.3g} (output units, std over repeats)",
        "output_spread": f"{r['output_spread']:.3g} (output units, std over inputs and outputs)",
        "snr": "n/a"
        if snr is None
        else ("inf (no read noise)" if snr == float("inf") else f"{snr:.3g} (spread / noise)"),
        "settings_used": r["settings_used"],
    }
    return [f"{k:>14}: {v}" for k, v in rows.items()] + [f"warning: {w}" for w in r["warnings"]]
