"""A new chip from an old run: each trial's setting on every unseen chip, deployed as-is,
after a recalibration of K settings, after a fine-tune of F more, and against that chip's own
oracle (``compare --recalibrate K [--finetune F]``).

For every finished trial and unseen chip seed, a fleet job trains on the chip with
``train(device, device_kw={..., "seed": chip}, init_from=<the trial's run>)``:

- **recalibration**, budget K: a twin run (one that saved ``calibration.pt``: ``twin``,
  ``twin-sat``) runs ``twin`` with ``settings=K``: K settings refit its calibration (warm or
  from the datasheet, whichever fits better), then it retrains on the twin, which costs no
  setting. Any other method has no model of the chip to refit, so its recalibration is a
  K-setting ``spsa`` fine-tune from the run's theta and gain: the one device method that needs
  only the contract and starts from a given point, so K means K device settings for every
  method and the rows compare.
- **fine-tune**, budget K + F: ``twin-sat`` with ``settings=K`` for a twin run (the
  recalibration, then device steps and refinement), ``spsa`` for K + F settings otherwise.
- **chip oracle**: ``oracle`` on the chip (model-based, no settings), once per chip, where
  the device has a true model; None otherwise.

A job's options are the trial's ``--set`` values that the job's method accepts, plus
``settings=K`` for the twin methods. Jobs run one at a time in this process. Like trials,
each writes its row to ``OUT/fleet/trials/METHOD-seedS-chipC.json`` with its configuration
and is skipped when re-run with the same one; its runs go to ``OUT/fleet/runs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blackbox_sat.devices.contract import InvalidInput, UserError
from blackbox_sat.methods.registry import get_method
from blackbox_sat.training.config import as_dict

from .evaluate import evaluate
from .run import method_config, train, write_json_atomic
from .trials import Trial, config_diff, trial_config

#: Methods whose runs carry a calibration that a new chip's settings refit.
TWIN_METHODS = ("twin", "twin-sat")


@dataclass(frozen=True)
class FleetJob:
    """One trial's setting moved to one unseen chip."""

    trial: Trial
    chip: int
    recalibrate: int
    finetune: int | None

    @property
    def key(self) -> str:
        return f"{self.trial.key}-chip{self.chip}"

    @property
    def root(self) -> Path:
        return Path(self.trial.out) / "fleet"

    @property
    def row_path(self) -> Path:
        return self.root / "trials" / f"{self.key}.json"

    @property
    def run_dir(self) -> Path:
        return (
            self.root / "runs" / self.trial.method / f"seed{self.trial.seed}" / f"chip{self.chip}"
        )

    @property
    def twin(self) -> bool:
        return self.trial.method in TWIN_METHODS


def check_fleet(recalibrate, finetune, unseen: tuple) -> None:
    """Refuse a bad K or F, or a study with no unseen chip, before anything runs."""
    for name, v in (("recalibrate", recalibrate), ("finetune", finetune)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidInput(
                f"--{name} must be an int >= 1 (device settings per chip), got {v!r}"
            )
    if finetune is not None and recalibrate is None:
        raise InvalidInput("--finetune F needs --recalibrate K (the fine-tune starts with it)")
    if recalibrate is not None and not unseen:
        raise InvalidInput(
            "--recalibrate needs unseen chips: a device that takes a seed keyword, or --unseen "
            "seed=101,..."
        )


def fleet_jobs(trials: list[Trial], recalibrate: int, finetune: int | None) -> list[FleetJob]:
    """Every trial on every one of its unseen chips, trials outermost."""
    return [FleetJob(t, int(c), recalibrate, finetune) for t in trials for c in t.unseen]


def _options(method: str, trial: Trial, extra: dict) -> dict:
    """The trial's ``--set`` values that ``method``'s configuration takes, plus ``extra``."""
    names = {f.name for f in dataclasses.fields(get_method(method).config)}
    cfg = {k: v for k, v in trial.config.items() if k.split(".")[0] in names}
    cfg.setdefault("threads", trial.threads)
    return {**cfg, **extra}


def plan(job: FleetJob) -> dict:
    """``{stage: (method, budget, options)}`` of a job: ``recal`` and, with F, ``finetune``."""
    k = job.recalibrate
    twin = {"settings": k}
    stages = {
        "recal": ("twin", k, _options("twin", job.trial, twin))
        if job.twin
        else ("spsa", k, _options("spsa", job.trial, {}))
    }
    if job.finetune is not None:
        budget = k + job.finetune
        stages["finetune"] = (
            ("twin-sat", budget, _options("twin-sat", job.trial, twin))
            if job.twin
            else ("spsa", budget, _options("spsa", job.trial, {}))
        )
    return stages


def job_config(job: FleetJob) -> dict:
    """Everything that decides a job's row (its trial's configuration included), as JSON."""
    stages = {}
    for stage, (method, budget, opts) in plan(job).items():
        with contextlib.suppress(UserError):  # a bad option: the job's row records it
            opts = as_dict(method_config(method, opts))
        stages[stage] = {"method": method, "budget": budget, "config": opts}
    cfg = {"trial": trial_config(job.trial), "chip": job.chip, "stages": stages}
    return json.loads(json.dumps(cfg, default=lambda a: a.tolist()))


def stale(jobs: list[FleetJob]) -> dict[str, list[str]]:
    """Jobs whose stored row is finished but of another configuration: key -> differing keys."""
    out = {}
    for job in jobs:
        if job.row_path.exists():
            prev = json.loads(job.row_path.read_text())
            diff = config_diff(prev.get("job"), job_config(job))
            if prev["status"] == "ok" and diff:
                out[job.key] = diff
    return out


def run_fleet(jobs: list[FleetJob], trial_rows: dict, on_done=None) -> list[dict]:
    """Run the jobs whose trial finished (``trial_rows``: key -> row), reusing each stored
    row of the same configuration; returns the rows in job order."""
    rows = []
    for job in jobs:
        trial_row = trial_rows.get(job.trial.key)
        if trial_row is None or trial_row["status"] != "ok":
            continue
        row = None
        if job.row_path.exists():
            prev = json.loads(job.row_path.read_text())
            if prev["status"] == "ok" and not config_diff(prev.get("job"), job_config(job)):
                row = prev
        rows.append(row if row is not None else run_job(job, trial_row))
        if on_done is not None:
            on_done(job)
    return rows


def run_job(job: FleetJob, trial_row: dict) -> dict:
    """Measure one trial's setting on one chip; never raises (a failure is a ``failed`` row)."""
    t0 = time.perf_counter()
    t = job.trial
    row: dict = {"method": t.method, "seed": t.seed, "chip": job.chip, "status": "ok", "error": ""}
    kw = {**t.device_kw, "seed": job.chip}
    try:
        as_is = trial_row.get(f"unseen_{job.chip}")
        if as_is is None:
            as_is = evaluate(t.run_dir, device_kw={"seed": job.chip})["accuracy"]
        row["acc_as_is"] = as_is
        for stage, (method, budget, opts) in plan(job).items():
            res = train(
                t.device,
                task=t.task,
                method=method,
                budget=budget,
                seed=t.seed,
                out=job.run_dir / stage,
                device_kw=kw,
                config=opts,
                progress=False,
                overwrite=True,
                init_from=t.run_dir,
            )
            row[f"{stage}_method"] = method
            row[f"acc_{stage}"] = res["accuracy"]
            row[f"settings_{stage}"] = res["settings_used"]
        row["acc_oracle"] = chip_oracle(job)
    except Exception as exc:
        row.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=8),
        )
    row["wall_s"] = time.perf_counter() - t0
    row["job"] = job_config(job)
    job.row_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job.row_path, row)
    return row


def chip_oracle(job: FleetJob) -> float | None:
    """Test accuracy of ``oracle`` trained on the chip's true model (None where the device
    has none); one run per chip and configuration, shared by the trials."""
    t = job.trial
    from blackbox_sat.devices.spec import load_device

    kw = {**t.device_kw, "seed": job.chip}
    if getattr(load_device(t.device, **kw), "true_model", None) is None:
        return None
    opts = _options("oracle", t, {})
    want = {
        "device": t.device,
        "device_kw": trial_config(t)["device_kw"],
        "task": t.task,
        "chip": job.chip,
        "config": as_dict(method_config("oracle", opts)),
    }
    want = json.loads(json.dumps(want, default=lambda a: a.tolist()))
    path = job.root / "trials" / f"oracle-chip{job.chip}.json"
    if path.exists():
        prev = json.loads(path.read_text())
        if not config_diff(prev["job"], want):
            return prev["accuracy"]
    res = train(
        t.device,
        task=t.task,
        method="oracle",
        budget=1,  # model-based: no setting is spent
        seed=0,
        out=job.root / "runs" / "oracle" / f"chip{job.chip}",
        device_kw=kw,
        config=opts,
        progress=False,
        overwrite=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"accuracy": res["accuracy"], "job": want})
    return res["accuracy"]


#: Columns of ``fleet.csv`` (the stages' method names and settings follow).
FLEET_FIELDS = ("method", "seed", "chip", "status", "error", "acc_as_is", "acc_recal")


def write_fleet(rows: list[dict], out: Path) -> str:
    """Write ``fleet.csv``; return the markdown section for ``summary.md``."""
    import csv

    keys = list(dict.fromkeys([*FLEET_FIELDS, *(k for r in rows for k in r)]))
    keys = [k for k in keys if k not in ("traceback", "job")]
    tmp = out / "fleet.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "fleet.csv")
    return fleet_table(rows)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _pct(v: float | None) -> str:
    return "N/A" if v is None else f"{100 * v:.1f}"


def _ratio(rows: list[dict], key: str) -> str:
    vals = [
        r[key] / r["acc_oracle"] for r in rows if r.get(key) is not None and r.get("acc_oracle")
    ]
    return "N/A" if not vals else f"{np.mean(vals):.3f}×"


def fleet_table(rows: list[dict]) -> str:
    """Per method and unseen chip, the mean over seeds: as-is, after the recalibration (and
    the fine-tune), the chip's oracle, each against the oracle; then a mean row per method."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not rows:
        return ""
    ft = any("acc_finetune" in r for r in ok)
    k = next((r["job"]["stages"]["recal"]["budget"] for r in rows if "job" in r), "K")
    kf = next(
        (
            r["job"]["stages"]["finetune"]["budget"]
            for r in rows
            if "finetune" in r["job"]["stages"]
        ),
        None,
    )
    cols = ["as-is", f"recalibrated ({k})"] + ([f"fine-tuned ({kf})"] if ft else [])
    head = (
        "| method | chip | "
        + " | ".join(cols)
        + " | chip oracle | "
        + " | ".join(f"{c} / oracle" for c in cols)
        + f" | settings{' (recal / fine-tune)' if ft else ''} | failed |"
    )
    lines = [
        f"## Per unseen chip: as-is / after {k}-setting recalibration"
        + (f" / after a fine-tune to {kf} settings" if ft else "")
        + " / chip oracle",
        "",
        "Test accuracy in %, mean over training seeds; ratios are means of per-run ratios to "
        "the chip's own `oracle`. Recalibration: `twin --set settings=K` from a twin run's "
        "calibration, a K-setting `spsa` fine-tune for other methods; fine-tune: `twin-sat` "
        "(twin runs) or `spsa` (others); settings: the most spent on a chip (no gain setting: the run's is kept). `fleet.csv` has "
        "every run.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    keys = ["acc_as_is", "acc_recal"] + (["acc_finetune"] if ft else [])
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        chips = list(dict.fromkeys(r["chip"] for r in mine))
        for chip in [*chips, "mean"]:
            sel = [r for r in mine if chip == "mean" or r["chip"] == chip]
            good = [r for r in sel if r["status"] == "ok"]
            spent = " / ".join(
                str(max(int(r[f"settings_{st}"]) for r in good)) if good else "N/A"
                for st in ("recal", "finetune")[: 1 + ft]
            )
            lines.append(
                f"| {method} | {'**mean**' if chip == 'mean' else chip} | "
                + " | ".join(_pct(_mean(good, c)) for c in keys)
                + f" | {_pct(_mean(good, 'acc_oracle'))} | "
                + " | ".join(_ratio(good, c) for c in keys)
                + f" | {spent} | {len(sel) - len(good)} |"
            )
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"- {r['method']} seed {r['seed']} chip {r['chip']}: {r['error']}" for r in failed]
    return "\n".join(lines)
