"""Measure grey-box calibration (``surrogates.calibrated``) on the built-in simulators.

For each (device, number of settings): random settings (over the whole bounds, or near the
device's working point with ``--design local``) x ``--inputs`` inputs per setting, of which
``--repeats`` are repeated in the same query (so the read noise is estimated from the data);
inputs are the digits task's device inputs (the benchmark's fixed encoding) or random vectors.
Held-out error is measured on ``--test`` further settings (whole settings, never seen) drawn
both globally and near the working point (``describe(dev).start(0)``, radius ``--radius``
bound widths), as
normalised RMSE (output spreads) of the datasheet model and of the calibrated one; parameter
error is the rms against ``calibration_truth()``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/calibration_table.py --device mzi --settings 5 10 20 40
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import describe
from blackbox_sat.sim import BUILTINS
from blackbox_sat.sim.calibration import parameter_rms
from blackbox_sat.training.pnn import PNN
from surrogates import make_surrogate


def input_pool(dev, kind: str, rng) -> np.ndarray:
    if kind == "digits":
        data = load_task("digits")
        pnn = PNN.build(data.x_train, data.n_classes, describe(dev))
        return np.asarray(pnn.device_inputs(pnn.features(data.x_train)))
    lo, hi = dev.input_bounds
    return rng.uniform(lo, hi, (4096, dev.in_dim))


def settings(dev, n: int, design: str, radius: float, rng) -> np.ndarray:
    lo, hi = (np.broadcast_to(np.asarray(b, float), (dev.n_params,)) for b in dev.bounds)
    if design == "global":
        return rng.uniform(lo, hi, (n, dev.n_params))
    centre = describe(dev).start(0)  # the toolkit's shared working point
    th = centre + radius * (hi - lo) * rng.uniform(-1, 1, (n, dev.n_params))
    return describe(dev).project(th)


def measure(dev, thetas, pool, n_inputs: int, repeats: int, rng):
    rows = []
    for s, th in enumerate(thetas):
        x = pool[rng.choice(len(pool), n_inputs - repeats, replace=False)]
        x = np.concatenate([x, x[:repeats]])
        rows.append((np.repeat(th[None], len(x), 0), x, dev.query(th, x), np.full(len(x), s)))
    return tuple(np.concatenate(c) for c in zip(*rows))


def nrmse(pred, y, spread):
    return float(np.sqrt(np.mean(((pred - y) / spread) ** 2)))


def mrr_combos(model) -> dict[str, torch.Tensor]:
    """The mrr ring's identifiable combinations: cold detuning and tuning rate, in linewidths."""
    from blackbox_sat.sim.mrr import DETUNE0, ETA, FWHM, HEATER_R

    p = dict(model.named_parameters()) if not isinstance(model, dict) else model
    w = FWHM * torch.exp(p["log_width"].detach())
    return {
        "detune_per_width": (DETUNE0 - p["offset"].detach()) / w,
        "rate_per_width": ETA * HEATER_R * torch.exp(p["log_heater"].detach()) / w,
    }


def run(device: str, n_settings: int, args, dev_kw: dict) -> dict:
    rng = np.random.default_rng([args.seed, n_settings])
    dev = BUILTINS[device](seed=args.chip, **dev_kw)
    pool = input_pool(dev, args.x, rng)
    th, x, y, g = measure(
        dev,
        settings(dev, n_settings, args.design, args.radius, rng),
        pool,
        args.inputs,
        args.repeats,
        rng,
    )
    tests = {
        d: measure(dev, settings(dev, args.test, d, args.radius, rng), pool, args.inputs, 0, rng)
        for d in ("global", "local")
    }
    model = dev.calibration_model()
    kind = "calibrated+residual" if args.residual else "calibrated"
    t0 = time.perf_counter()
    sur = make_surrogate(kind, model=model, seed=args.seed, max_iter=args.max_iter).fit(th, x, y, g)
    fit_s = time.perf_counter() - t0
    spread = y.std(0)
    nominal = dev.calibration_model()
    errors = {}
    for d, (th_t, x_t, y_t, g_t) in tests.items():
        with torch.no_grad():
            pred = sur.predict(th_t, x_t).numpy()
            ds = torch.cat(
                [
                    nominal(torch.as_tensor(th_t[g_t == s][0]), torch.as_tensor(x_t[g_t == s]))
                    for s in np.unique(g_t)
                ]
            ).numpy()
            tr = torch.cat(
                [
                    dev.true_model()(
                        torch.as_tensor(th_t[g_t == s][0]), torch.as_tensor(x_t[g_t == s])
                    )
                    for s in np.unique(g_t)
                ]
            ).numpy()
        y_sorted = np.concatenate([y_t[g_t == s] for s in np.unique(g_t)])
        errors[d] = {
            "datasheet": nrmse(ds, y_sorted, spread),
            "calibrated": nrmse(pred, y_t, spread),
            "truth": nrmse(tr, y_sorted, spread),
        }
    truth = dev.calibration_truth()
    rms, rms0 = parameter_rms(sur.model, truth), parameter_rms(nominal, truth)
    rep = sur.report
    out = {
        "device": device,
        "kw": dev_kw,
        "settings": n_settings,
        "inputs": args.inputs,
        "design": args.design,
        "x": args.x,
        "test": errors,
        "internal_heldout_datasheet": rep["datasheet_heldout_nrmse"],
        "internal_heldout": rep["heldout_nrmse"],
        "noise_nrmse": rep["noise_nrmse"],
        "param_rms": rms,
        "param_rms_datasheet": rms0,
        "fit_s": fit_s,
        "restarts": rep["restarts"],
        "attempts": [
            (
                a["iterations"],
                round(a["seconds"], 1),
                a["train_nrmse"],
                a["heldout_nrmse"],
                a["stalled"],
            )
            for a in rep["attempts"]
        ],
    }
    if "residual" in rep:
        out["residual"] = rep["residual"]
    if device == "mrr":
        c, c_true, c0 = mrr_combos(sur.model), mrr_combos(truth), mrr_combos(nominal)
        out["combo_rel_rms"] = {
            k: float(((c[k] - c_true[k]) / c_true[k]).pow(2).mean().sqrt()) for k in c
        }
        out["combo_rel_rms_datasheet"] = {
            k: float(((c0[k] - c_true[k]) / c_true[k]).pow(2).mean().sqrt()) for k in c
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="mzi")
    ap.add_argument("--settings", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--inputs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--x", choices=["digits", "random"], default="digits")
    ap.add_argument("--design", choices=["global", "local"], default="global")
    ap.add_argument("--radius", type=float, default=0.05)
    ap.add_argument("--residual", action="store_true")
    ap.add_argument("--max-iter", type=int, default=400)
    ap.add_argument("--chip", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kw", default="{}", help="device keywords, JSON")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for n in args.settings:
        res = run(args.device, n, args, json.loads(args.kw))
        line = json.dumps(res, default=float)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
