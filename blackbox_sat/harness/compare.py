"""The comparison harness: every method on the same device, task, budget and seeds.

A study is a generator of seeded trials (method x seed). Each trial trains into
``OUT/runs/METHOD/seedS`` and is then evaluated on the trained chip, on unseen chips
(device seeds, docs/protocol.md: 101-105) and over the device's sweep (drift or
misalignment). Its row is written to ``OUT/trials/METHOD-seedS.json``; a trial whose
row exists is skipped when the command is re-run. A trial that raises is recorded as
failed and the others go on. ``results.csv`` and ``summary.md`` are rebuilt from the rows.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import InvalidInput

from .backends import run_trials
from .fleet import check_fleet, fleet_jobs, run_fleet, stale, write_fleet
from .run import write_json_atomic
from .trials import (  # noqa: F401  (Trial, run_trial: public names)
    DEFAULT_SWEEPS,
    UNSEEN_SEEDS,
    Study,
    Trial,
    config_diff,
    run_trial,
    seedable,
    trial_config,
)

SUMMARY_FIELDS = (
    "acc_chip",
    "acc_unseen_mean",
    "acc_unseen_min",
    "acc_drift_mean",
    "settings_used",
    "samples_used",
    "wall_s",
    "sharpness",
)


def compare(
    device,
    task="digits",
    methods=("offline", "oracle"),
    seeds=3,
    budget: int = 2000,
    out: str | Path = "runs/compare",
    device_kw: dict | None = None,
    config: dict | None = None,
    unseen=None,
    sweep: dict | None = None,
    workers: int = 1,
    progress: bool = True,
    rerun_failed: bool = True,
    backend: str = "local",
    address: str | None = None,
    rerun_changed: bool = False,
    overwrite: bool = False,
    recalibrate: int | None = None,
    finetune: int | None = None,
) -> dict:
    """Run a study and write ``results.csv`` and ``summary.md`` into ``out``.

    ``seeds``: a count (0..K-1) or a list. ``unseen``: device seeds of unseen chips (default
    101-105 for a seedable device, none otherwise). ``sweep``: ``{key: [values]}`` of device
    keywords (default per built-in). ``backend``: ``local`` (``workers`` processes) or
    ``ray`` (a local Ray instance, or the cluster at ``address``); see :mod:`.backends`.
    A finished trial in ``out`` is reused only if its stored configuration equals the one
    requested; a different one raises :class:`InvalidInput` naming the keys, unless
    ``rerun_changed`` (then it runs afresh). ``overwrite``: delete the trials, runs, tables
    and plots already in ``out`` first, so every trial runs afresh. The methods' options, the
    budget and the device keywords are checked before ``out`` is created.
    ``recalibrate``: K settings; each finished trial's setting is then measured on every
    unseen chip as-is, after a K-setting recalibration (and, with ``finetune`` F, after a
    fine-tune to K + F settings) and against the chip's own oracle (:mod:`.fleet`), into
    ``fleet.csv`` and a section of ``summary.md``. Returns ``{"rows", "summary", "out",
    "files", "fleet"}`` (``fleet``: the per-chip rows, empty without ``recalibrate``).
    """
    if not isinstance(device, str):
        raise InvalidInput(
            "compare needs a device spec string, so that unseen chips and workers can rebuild it"
        )
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    study = Study(
        device,
        list(methods),
        seeds,
        budget,
        task,
        dict(device_kw or {}),
        dict(config or {}),
        None if unseen is None else tuple(unseen),
        sweep,
        str(out),
    )
    check_fleet(recalibrate, finetune, next(iter(study.trials())).unseen if study.seeds else ())
    _check_study(study)
    if overwrite:
        _clear(Path(out))
    jobs = [] if recalibrate is None else fleet_jobs(list(study.trials()), recalibrate, finetune)
    todo, rows, changed = [], {}, {}
    for t in study.trials():
        if t.row_path.exists():
            prev = json.loads(t.row_path.read_text())
            if prev["status"] == "ok" or not rerun_failed:
                diff = config_diff(prev.get("trial"), trial_config(t))
                if not diff:
                    rows[t.key] = prev
                    continue
                if not rerun_changed:
                    changed[t.key] = diff
        todo.append(t)
    if not rerun_changed:  # a per-chip row of another configuration is refused the same way
        changed.update(stale(jobs))
    if changed:  # refused before anything is written or run
        raise InvalidInput(
            f"{Path(out) / 'trials'} holds finished trials of another configuration: "
            + "; ".join(f"{key} differs in {', '.join(d)}" for key, d in changed.items())
            + ". Choose another --out, or pass --rerun-changed to run them afresh"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "study.json", _public(study.__dict__))
    if rows:
        # Reused rows come from whatever code wrote them: say so, since a changed method or
        # default would otherwise be silently mixed with old results.
        warnings.warn(
            f"compare: reusing {len(rows)} finished trial(s) from {Path(out) / 'trials'}; pass "
            f"--overwrite (or choose another --out) to run them afresh",
            stacklevel=2,
        )
    bar = tqdm(total=len(todo), desc="trials", disable=not progress)
    for t, row in run_trials(
        todo,
        backend=backend,
        workers=workers,
        address=address,
        on_start=lambda t: bar.set_postfix_str(t.key),
    ):
        rows[t.key] = row  # streamed back as trials finish (see backends.py)
        bar.update()
    bar.close()
    ordered = [rows[t.key] for t in study.trials() if t.key in rows]
    bar = tqdm(total=len(jobs), desc="chips", disable=not progress or not jobs)
    fleet = run_fleet(jobs, rows, on_done=lambda job: bar.update())
    bar.close()
    task = load_task(study.task)
    chance = 1 / task.n_classes
    summary = summarise(ordered, chance=chance, n_test=len(task.y_test))
    sections = [write_fleet(fleet, Path(out))] if jobs else []
    files = write_results(ordered, summary, Path(out), study, chance=chance, sections=sections)
    if jobs:
        files.insert(2, str(Path(out) / "fleet.csv"))
    return {"rows": ordered, "summary": summary, "out": str(out), "files": files, "fleet": fleet}


def _check_study(study: Study) -> None:
    """Refuse a bad ``--set`` value, budget or device keyword, or a method the device cannot
    serve, before any trial runs (each trial would otherwise fail the same way, after the
    study's folder was made)."""
    from blackbox_sat.devices.contract import MissingCapability, describe
    from blackbox_sat.devices.spec import check_keywords, load_device, resolve_factory
    from blackbox_sat.methods.registry import get_method, missing

    from .run import method_config

    if isinstance(study.budget, bool) or not isinstance(study.budget, int) or study.budget < 1:
        raise InvalidInput(f"budget must be an int >= 1 (device settings), got {study.budget!r}")
    configs = {t.method: method_config(t.method, t.config) for t in study.trials()}
    if study.device.startswith("tcp://"):
        return
    check_keywords(resolve_factory(study.device), study.device_kw, study.device)
    device = load_device(study.device, **study.device_kw)  # built, never queried
    info = describe(device)
    for method, cfg in configs.items():
        lacking = missing(get_method(method), device, info, cfg)
        if lacking:
            raise MissingCapability(
                f"method {method!r} needs {' and '.join(lacking)}, which {study.device} lacks"
            )


#: What a study writes into its folder (``--overwrite`` deletes these, nothing else).
STUDY_FILES = (
    *("study.json", "results.csv", "summary.md", "fleet.csv"),
    *("curves.png", "sweep.png", "unseen.png", "sigma.png"),
)


def _clear(out: Path) -> None:
    import shutil

    for name in ("trials", "runs", "fleet"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in STUDY_FILES:
        (out / name).unlink(missing_ok=True)


def _public(study: dict) -> dict:
    """The study as written to disk: secrets (a device token) never are."""
    from .run import SECRET_DEVICE_KW

    kw = {k: v for k, v in study["device_kw"].items() if k not in SECRET_DEVICE_KW}
    return {**study, "device_kw": kw}


def summarise(rows: list[dict], chance: float | None = None, n_test: int | None = None) -> dict:
    """Per method: mean and std over seeds of every SUMMARY_FIELDS entry, plus the curve.

    ``chance`` (1 / classes) and ``n_test`` mark methods whose accuracy is at chance (see
    :func:`at_chance`); they get no ``settings_to_target``."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        entry = {
            "n_ok": len(ok),
            "n_failed": sum(r["method"] == method for r in rows) - len(ok),
            "model_based": _model_based(method),
        }
        for f in SUMMARY_FIELDS + tuple(
            sorted(
                {k for r in ok for k in r if k.startswith("curve_")},
                key=lambda k: int(k.split("_")[1]),
            )
        ):
            vals = [r[f] for r in ok if r.get(f) is not None]
            entry[f] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
        entry["at_chance"] = at_chance(entry["acc_chip"], chance, n_test)
        out[method] = entry
    _settings_to_target(out)
    return out


def at_chance(acc: tuple | None, chance: float | None, n_test: int | None) -> bool:
    """Whether a mean accuracy is within 3 binomial standard errors of chance on ``n_test``
    inputs: indistinguishable from guessing, so no settings-to-target is reported for it."""
    if acc is None or chance is None or not n_test:
        return False
    return acc[0] <= chance + 3 * np.sqrt(chance * (1 - chance) / n_test)


def _model_based(method: str) -> bool:
    from blackbox_sat.methods.registry import get_method

    try:
        return get_method(method).model_based
    except KeyError:
        return False


def _settings_to_target(summary: dict) -> None:
    """Settings each device method needs to reach the best gradient-free method's final
    accuracy. Both sides are read from the ``curve`` snapshots (one kind of measurement):
    the target is the best final curve point among ``spsa`` and ``ng-*``."""

    def curve_keys(e):
        return sorted(
            (k for k in e if k.startswith("curve_") and e[k]), key=lambda k: int(k.split("_")[1])
        )

    gf = [
        m
        for m in summary
        if (m.startswith("ng-") or m == "spsa")
        and curve_keys(summary[m])
        and not summary[m].get("at_chance")
    ]
    target = max((summary[m][curve_keys(summary[m])[-1]][0] for m in gf), default=None)
    for e in summary.values():
        e["target"] = target
        e["settings_to_target"] = None
        if target is None or e["model_based"] or e.get("at_chance"):
            continue
        keys = curve_keys(e)
        reached = [int(k.split("_")[1]) for k in keys if e[k][0] >= target - 1e-12]
        e["settings_to_target"] = (
            reached[0] if reached else (f"> {keys[-1].split('_')[1]}" if keys else None)
        )


def _fmt(v, pct=True, spread=True) -> str:
    """``mean ± std``; the mean alone where there is no spread to show (one seed)."""
    if v is None:
        return "N/A"
    m, s = v
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}" if spread else f"{100 * m:.1f}"
    num = f"{m:.0f}" if abs(m) >= 100 else f"{m:.3g}"  # settings and seconds as whole numbers
    return f"{num} ± {s:.2g}" if spread else num


def _to_target(e: dict) -> str:
    if e.get("at_chance") and not e["model_based"]:
        return "- (at chance)"
    v = e["settings_to_target"]
    return "-" if v is None else str(v)


#: The line under the table that says what settings-to-target is.
TO_TARGET = (
    "`settings-to-target`: the first curve point (settings spent) at which a device method's "
    "mean test accuracy reaches the best final accuracy of the gradient-free methods (spsa, "
    "ng-*); `> N` if never; not given for a method at chance (within 3 standard errors of "
    "1 / classes) or when every gradient-free method is."
)


def summary_table(summary: dict) -> str:
    """Markdown table of the summary (accuracies in %)."""
    head = (
        "| method | kind | acc_chip | acc_unseen_mean | acc_unseen_min | acc_drift_mean | settings | "
        "settings-to-target | sharpness | wall s | failed |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, e in summary.items():
        sp = e["n_ok"] > 1
        lines.append(
            f"| {m} | {'model-based' if e['model_based'] else 'device'} | {_fmt(e['acc_chip'], spread=sp)} | "
            f"{_fmt(e['acc_unseen_mean'], spread=sp)} | {_fmt(e['acc_unseen_min'], spread=sp)} | "
            f"{_fmt(e['acc_drift_mean'], spread=sp)} | {_fmt(e['settings_used'], False, sp)} | "
            f"{_to_target(e)} | {_fmt(e['sharpness'], False, sp)} | {_fmt(e['wall_s'], False, sp)} | "
            f"{e['n_failed']} |"
        )
    return "\n".join(lines)


def write_results(
    rows: list[dict],
    summary: dict,
    out: Path,
    study: Study,
    chance: float | None = None,
    sections: Sequence[str] = (),
) -> list[str]:
    """Write ``results.csv``, ``summary.md`` (with ``sections``, markdown, after the tables)
    and the plots; return the paths written."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("traceback", "trial")))
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "results.csv")
    curve_keys = sorted(
        {k for e in summary.values() for k in e if k.startswith("curve_")}, key=lambda k: int(k[6:])
    )
    text = [
        f"# Comparison on `{study.device}` {_public(study.__dict__)['device_kw'] or ''}",
        "",
        f"task `{study.task}`, budget {study.budget} settings, seeds {study.seeds}; mean ± std over seeds; "
        "accuracies in %. Unseen chips: device seeds "
        f"{list(study.unseen) if study.unseen is not None else list(UNSEEN_SEEDS) if seedable(study.device) else 'none'}; sweep: "
        f"{study.sweep if study.sweep is not None else DEFAULT_SWEEPS.get(study.device, 'none')}.",
        "",
        summary_table(summary),
        "",
        TO_TARGET + (f" Chance is {100 * chance:.1f} %." if chance else ""),
        "",
    ]
    if curve_keys:
        text += [
            "## Accuracy against settings (acc_chip, %)",
            "",
            "| method | " + " | ".join(k[6:] for k in curve_keys) + " |",
            "|---|" + "---|" * len(curve_keys),
        ]
        for m, e in summary.items():
            if not e["model_based"]:
                text.append(
                    f"| {m} | "
                    + " | ".join(_fmt(e.get(k), spread=e["n_ok"] > 1) for k in curve_keys)
                    + " |"
                )
    for section in sections:
        text += ["", section]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        text += ["", "## Failed trials", ""] + [
            f"- {r['method']} seed {r['seed']}: {r['error']}" for r in failed
        ]
    from .plots import write_plots

    plots = write_plots(rows, out, chance=chance)
    if plots:
        text += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    return [str(out / "results.csv"), str(out / "summary.md")] + [str(out / p) for p in plots]
