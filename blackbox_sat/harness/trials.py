"""A study as a generator of seeded trials, and one trial's run: train, then evaluate on the
trained chip, on unseen chips and over the device's sweep (drift or misalignment)."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blackbox_sat.devices.contract import UserError
from blackbox_sat.devices.spec import accepts_seed, public_kw, resolve_factory
from blackbox_sat.training.config import as_dict

from .evaluate import evaluate
from .run import method_config, train, write_json_atomic

UNSEEN_SEEDS = (101, 102, 103, 104, 105)
#: Post-deployment sweeps of the built-in simulators (docs/protocol.md).
DEFAULT_SWEEPS = {
    "mzi": {"drift": [-1.0, -0.5, 0.5, 1.0]},
    "mrr": {"drift": [-1.0, -0.5, 0.5, 1.0]},
    "freespace": {
        "rotation": [0.5, 1.0, 2.0],
        "shift": [0.5, 1.0, 2.0],
        "scale": [1.025, 1.05, 1.1],
    },
}
#: Error levels evaluated for the accuracy-against-sigma plot, as multiples of the chip's sigma.
SIGMA_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Trial:
    """One seeded experiment of a study."""

    method: str
    seed: int
    device: str
    device_kw: dict = field(repr=False)  # may hold a token
    task: str
    budget: int
    config: dict
    unseen: tuple
    sweep: dict
    out: str
    threads: int = 1
    sigmas: tuple = ()

    @property
    def key(self) -> str:
        return f"{self.method}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / "runs" / self.method / f"seed{self.seed}"

    @property
    def row_path(self) -> Path:
        return Path(self.out) / "trials" / f"{self.key}.json"


@dataclass
class Study:
    device: str
    methods: list
    seeds: list
    budget: int = 2000
    task: str = "digits"
    device_kw: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # method -> {key: value}, or shared {key: value}
    unseen: tuple | None = None
    sweep: dict | None = None
    out: str = "runs/compare"

    def trials(self):
        """Yield the seeded trials, methods outermost."""
        unseen = self.unseen
        if unseen is None:
            unseen = UNSEEN_SEEDS if seedable(self.device) else ()
        sweep = self.sweep if self.sweep is not None else DEFAULT_SWEEPS.get(self.device, {})
        sigma = self.device_kw.get("sigma", _default_of(self.device, "sigma"))
        sigmas = (
            tuple(round(f * sigma, 6) for f in SIGMA_FACTORS)
            if isinstance(sigma, (int, float))
            else ()
        )
        for method in self.methods:
            cfg = (
                self.config.get(method, {})
                if any(k in self.config for k in self.methods)
                else dict(self.config)
            )
            for seed in self.seeds:
                yield Trial(
                    method,
                    int(seed),
                    self.device,
                    dict(self.device_kw),
                    self.task,
                    self.budget,
                    dict(cfg),
                    tuple(unseen),
                    {k: list(v) for k, v in sweep.items()},
                    str(self.out),
                    sigmas=sigmas,
                )


def _default_of(device, name: str):
    """The default of keyword ``name`` of a spec's factory, or None."""
    import inspect

    try:
        p = inspect.signature(resolve_factory(device)).parameters.get(name)
    except Exception:
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def seedable(device) -> bool:
    try:
        return (
            isinstance(device, str)
            and not device.startswith("tcp://")
            and accepts_seed(resolve_factory(device))
        )
    except Exception:
        return False


def trial_config(trial: Trial) -> dict:
    """Everything that decides a trial's row, as JSON data without secrets; stored in the row
    so that ``compare`` reuses it only for the same request. The method's configuration is
    resolved (defaults included), so a changed default counts as a change too."""
    cfg = {**trial.config, "threads": trial.config.get("threads", trial.threads)}
    with contextlib.suppress(UserError):  # an unknown method or key: the trial records it
        cfg = as_dict(method_config(trial.method, cfg))
    public = {
        "method": trial.method,
        "seed": trial.seed,
        "device": trial.device,
        "device_kw": public_kw(trial.device_kw),
        "task": trial.task,
        "budget": trial.budget,
        "config": cfg,
        "unseen": list(trial.unseen),
        "sweep": trial.sweep,
        "sigmas": list(trial.sigmas),
    }
    return json.loads(json.dumps(public, default=lambda a: a.tolist()))  # numpy values


def config_diff(stored: dict | None, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between a stored trial configuration and a requested
    one (``["<not recorded>"]`` for a row written before configurations were stored)."""
    if stored is None:
        return ["<not recorded>"]

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b, missing = flat(stored), flat(wanted), object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def run_trial(trial: Trial) -> dict:
    """Train and evaluate one trial; never raises (a failure becomes a ``failed`` row)."""
    import torch

    torch.set_num_threads(trial.threads)
    t0 = time.perf_counter()
    row = {
        "method": trial.method,
        "seed": trial.seed,
        "device": trial.device,
        "task": trial.task,
        "budget": trial.budget,
        "status": "ok",
        "error": "",
        "trial": trial_config(trial),  # what compare checks before reusing this row
    }
    try:
        cfg = dict(trial.config)
        cfg.setdefault("threads", trial.threads)
        result = train(
            trial.device,
            task=trial.task,
            method=trial.method,
            budget=trial.budget,
            seed=trial.seed,
            out=trial.run_dir,
            device_kw=trial.device_kw,
            config=cfg,
            progress=False,
            overwrite=True,
        )
        row.update(
            model_based=result["model_based"],
            acc_chip=result["accuracy"],
            val_accuracy=result["val_accuracy"],
            settings_used=result["settings_used"],
            samples_used=result["samples_used"],
            train_wall_s=result["wall_s"],
            sharpness=result["sharpness"],
            surrogate=result["extra"].get("surrogate", ""),
        )
        for point in result["curve"]:
            row[f"curve_{point['settings']}"] = point["accuracy"]
        unseen = [evaluate(trial.run_dir, device_kw={"seed": s})["accuracy"] for s in trial.unseen]
        for s, a in zip(trial.unseen, unseen):
            row[f"unseen_{s}"] = a
        row["acc_unseen_mean"] = float(np.mean(unseen)) if unseen else None
        row["acc_unseen_min"] = float(np.min(unseen)) if unseen else None
        swept = []
        for key, values in trial.sweep.items():
            for v in values:
                acc = evaluate(trial.run_dir, device_kw={key: v})["accuracy"]
                row[f"sweep_{key}={v}"] = acc
                swept.append(acc)
        row["acc_drift_mean"] = float(np.mean(swept)) if swept else None
        for sg in trial.sigmas:  # the deployed setting on this chip's error pattern, rescaled
            row[f"sigma_{sg:g}"] = evaluate(trial.run_dir, device_kw={"sigma": sg})["accuracy"]
    except Exception as exc:
        row.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=8),
        )
    row["wall_s"] = time.perf_counter() - t0
    trial.row_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(trial.row_path, row)
    return row
