"""Reproduce the claims of the SAT paper (Xu et al., Nat. Commun. 2026) with one command.

Thin over the public API: every number comes from ``blackbox_sat.compare`` (train, then
evaluate on the trained chip, unseen chips 101-105 and the drift or misalignment sweep) and
``blackbox_sat.evaluate``; the flatness measures from ``blackbox_sat.optim.sharpness``.
It writes ``paper.md`` and its figures into ``--out`` (default ``docs/``); the runs go to
``--runs`` (default ``runs/paper``), and a finished trial there is reused.

    python scripts/reproduce_paper.py --quick      # digits, mzi N=32, one seed: 11 min measured
    python scripts/reproduce_paper.py --full       # N=64, three seeds: about 4 h on digits
                                                   # (fashion-mnist, where its files exist, more)
    python scripts/reproduce_paper.py --quick --methods offline,oracle --budget 50 --out /tmp/p

The estimate is printed at start (docs/experiments.md, "reproduce_paper timing"); the full
figures are estimates, not measurements. ``--quick`` leaves ``pat`` out (its surrogate fit on
a 992-phase mesh outlasts it) unless ``--methods`` names it.

Sections: Table 1 (mzi with the hybrid PNN, sigma 0.15), transfer to unseen chips at sigma
0.10 and 0.15, accuracy against mrr / mzi drift and freespace misalignment for BP against SAT,
flatness against robustness, the SAT radius against transfer (on mzi; and mrr in --full),
and a verdict per claim by the rule in
``paper_report.verdict``. The report (tables, plots, ``paper.md``) is scripts/paper_report.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import blackbox_sat as bs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report beside this script
from paper_report import FLAT_RHO, PAIRS, SWEEPS, TABLE1, write_markdown

#: Unseen chips: the device seeds of docs/protocol.md.
UNSEEN = (101, 102, 103, 104, 105)
#: Extra error levels of the transfer table; Table 1's own sigma (0.15) is compare's unseen chips.
TRANSFER_SIGMAS = (0.10,)
#: The rho sweep, per device: the methods with a radius there (on an all-periodic mesh
#: ``blackbox-sat`` trains by harmonic steps, which have none, so ``insitu-sat`` takes its
#: place), and the radii (normalized L2; rho 0 is the same method without SAT); each radius
#: as plain SAM and, at the largest, ASAM (``adaptive``).
RHO_METHODS = {
    "mzi": ("oracle-sat", "insitu-sat", "twin-sat"),
    "mrr": ("oracle-sat", "blackbox-sat", "twin-sat"),
}
RHO_GRID = ((0.0, False), (0.05, False), (0.2, False), (0.5, False), (0.5, True))
#: Seconds per trial (train + every evaluation) in the measured --quick run (2 workers on the
#: 2-core box), mzi N=32 hybrid on digits, 2000 settings (docs/experiments.md,
#: "reproduce_paper timing"); only for the estimate printed at start. ``pat`` is a guess.
SECONDS = {
    "offline": 6,
    "offline-sat": 9,
    "nat": 10,
    "pat": 1800,
    "dat": 150,
    "insitu-sat": 47,
    "insitu-sat[rho=0]": 47,
    "oracle": 3,
    "oracle-sat": 8,
    "twin": 11,
    "twin-sat": 100,
    "blackbox-sat": 8,
}
#: Methods the quick preset leaves out unless named in --methods: their surrogate fit on a
#: 992-phase mesh alone outlasts the preset's time (SECONDS).
SLOW = ("pat",)
PRESETS = {
    "quick": dict(
        task="digits", n_modes=32, seeds=1, budget=2000, workers=2, rho=("mzi",), skip=SLOW
    ),
    "full": dict(
        task="fashion-mnist",
        n_modes=64,
        seeds=3,
        budget=2000,
        workers=2,
        rho=("mzi", "mrr"),
        skip=(),
    ),
}


def sections(p: dict) -> dict:
    """``{name: (device, device_kw, config, methods, sweep)}`` of the preset ``p``."""
    bp_sat = [m for pair in PAIRS for m in pair]
    return {
        "table1": (
            "mzi",
            {"n_modes": p["n_modes"], "sigma": 0.15},
            {"pnn": "hybrid", **p["set"]},
            [m for _, m, _ in TABLE1],
            SWEEPS["mzi"],
        ),
        "mrr": ("mrr", {}, dict(p["set"]), bp_sat, SWEEPS["mrr"]),
        "freespace": ("freespace", {}, dict(p["set"]), bp_sat, SWEEPS["freespace"]),
    }


def estimate_s(p: dict, plan: dict) -> float:
    """Estimated wall seconds of the plan: ``SECONDS`` per trial, scaled with the settings
    budget (device methods), with N^2 (phases; mzi only) and with the training set
    (model-based methods: fashion-mnist has ~40x digits' images), over the workers."""
    from blackbox_sat.methods.registry import METHODS

    bs.method_names()  # imports the methods, which registers them

    def trial_s(m: str, device: str) -> float:
        s = float(SECONDS.get(m, 100))
        spec = METHODS.get(variant(m)[0])
        if spec is not None and spec.model_based:
            s *= 40 if p["task"] == "fashion-mnist" else 1
        else:
            s *= p["budget"] / 2000
        return s * ((p["n_modes"] / 32) ** 2 if device == "mzi" else 1)

    total = 0.0
    for device, _, _, methods, _ in plan.values():
        for m in methods:
            if p["methods"] is None and m in p["skip"]:
                continue
            total += trial_s(m, device) * p["seeds"]
    for device in p.get("rho") or ():  # one seed per radius
        for m in RHO_METHODS[device]:
            if p["methods"] is None or m in p["methods"]:
                total += len(RHO_GRID) * trial_s(m, device)
    return total / max(1, p["workers"])


def variant(name: str) -> tuple[str, dict]:
    """``"insitu-sat[rho=0]"`` -> ``("insitu-sat", {"rho": "0"})``: a method with overrides."""
    if not name.endswith("]"):
        return name, {}
    base, _, opts = name[:-1].partition("[")
    return base, dict(kv.split("=", 1) for kv in opts.split(","))


def run_section(name: str, spec: tuple, p: dict, runs: Path) -> list[dict]:
    """Train and evaluate one section with ``compare`` (a variant ``m[k=v]`` in its own
    folder); unregistered methods become rows with status ``missing``."""
    device, kw, cfg, methods, sweep = spec
    known = set(bs.method_names())

    def wanted(m):
        if p["methods"] is None:
            return m not in p["skip"]
        return m in p["methods"] or variant(m)[0] in p["methods"]

    plain = [m for m in methods if m in known and wanted(m)]
    variants = [m for m in methods if m.endswith("]") and variant(m)[0] in known and wanted(m)]
    common = dict(task=p["task"], seeds=p["seeds"], budget=p["budget"], device_kw=kw)
    common.update(unseen=UNSEEN, sweep=sweep, progress=False)
    rows = []
    if plain:
        res = bs.compare(
            device, methods=plain, out=runs / name, config=cfg, workers=p["workers"], **common
        )
        for r in res["rows"]:
            r["run_dir"] = str(runs / name / "runs" / r["method"] / f"seed{r['seed']}")
        rows += res["rows"]
    for m in variants:
        base, over = variant(m)
        folder = (
            runs / name / m.replace("[", "-").replace("]", "").replace("=", "").replace(",", "-")
        )
        res = bs.compare(device, methods=[base], out=folder, config={**cfg, **over}, **common)
        for r in res["rows"]:
            r["run_dir"] = str(folder / "runs" / base / f"seed{r['seed']}")
            r["method"] = m
        rows += res["rows"]
    for m in methods:
        if variant(m)[0] not in known:
            rows.append({"method": m, "status": "missing"})
        elif p["methods"] is None and m in p["skip"]:
            rows.append({"method": m, "status": "skipped"})
    for r in rows:
        r["section"], r["device"] = name, device
    return rows


def rho_trial(device: str, m: str, rho: float, adaptive: bool, p: dict, runs: Path) -> list[dict]:
    """One trial of the rho sweep (method ``m`` at radius ``rho``, seed 0, chip 0)."""
    kw, cfg = ({"n_modes": p["n_modes"]}, {"pnn": "hybrid"}) if device == "mzi" else ({}, {})
    c = {**cfg, **p["set"], "rho": rho, "adaptive": adaptive}
    if m == "blackbox-sat":  # its refinement has its own radius; both move together
        c["refine.rho"] = rho
    folder = runs / "rho" / device / m / f"rho{rho:g}{'-asam' if adaptive else ''}"
    res = bs.compare(
        device,
        task=p["task"],
        methods=[m],
        seeds=[0],
        budget=p["budget"],
        out=folder,
        device_kw=kw,
        config=c,
        unseen=UNSEEN,
        sweep=SWEEPS[device],
        workers=1,
        progress=False,
    )
    for r in res["rows"]:
        r.update(section="rho", device=device, rho=rho, adaptive=adaptive)
        if r["status"] == "ok":
            r["run_dir"] = str(folder / "runs" / m / "seed0")
    return res["rows"]


def run_rho_sweep(p: dict, runs: Path) -> list[dict]:
    """SAT radius against transfer: on each device of ``p["rho"]``, each of its RHO_METHODS at
    each of RHO_GRID (mzi with the hybrid PNN), trials in ``p["workers"]`` processes (spawned:
    a forked torch can hang); rows carry ``rho``, ``adaptive`` and section ``rho``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    known = set(bs.method_names())
    jobs = [
        (device, m, rho, adaptive)
        for device in p["rho"]
        for m in RHO_METHODS[device]
        if m in known and (p["methods"] is None or m in p["methods"])
        for rho, adaptive in RHO_GRID
    ]
    if p["workers"] <= 1:
        return [r for job in jobs for r in rho_trial(*job, p, runs)]
    with ProcessPoolExecutor(p["workers"], mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(rho_trial, *job, p, runs) for job in jobs]
        return [r for f in futures for r in f.result()]


def add_transfer(rows: list[dict]) -> None:
    """``transfer_<sigma>``: mean accuracy of Table 1's runs on chips 101-105 at each sigma
    (the paper's error level, which only ``mzi``'s sigma is), deployed as-is."""
    for r in rows:
        if r["status"] != "ok" or r["section"] != "table1":
            continue
        for sg in TRANSFER_SIGMAS:
            accs = [
                bs.evaluate(r["run_dir"], device_kw={"seed": s, "sigma": sg})["accuracy"]
                for s in UNSEEN
            ]
            r[f"transfer_{sg:g}"] = float(np.mean(accs))


def worst_case_loss_of(run_dir: str, rho: float = FLAT_RHO, n: int = 256) -> float:
    """Worst-case training loss in the rho-ball around the trained setting, on the training
    chip's true model (the loss SAT minimizes); NaN for a device without one."""
    import torch
    import torch.nn.functional as F

    from blackbox_sat.data.tasks import load_task
    from blackbox_sat.harness.evaluate import load_run
    from blackbox_sat.optim.sharpness import worst_case_loss

    pnn, theta, cfg = load_run(run_dir)
    device = bs.load_device(cfg["device"], **cfg["device_kw"])
    if not hasattr(device, "true_model"):
        return float("nan")
    data = load_task(cfg["task"])
    model, scale = device.true_model(), bs.describe(device).scale
    with torch.no_grad():
        x = pnn.device_inputs(pnn.features(data.x_train[:n])).to(torch.float64)
    y = torch.as_tensor(data.y_train[:n])
    pnn = pnn.double()

    def loss(th):
        return F.cross_entropy(pnn(model(th, x)), y)

    return worst_case_loss(loss, torch.as_tensor(theta, dtype=torch.float64), rho, scale=scale)


def add_flatness(rows: list[dict]) -> None:
    """``worst_loss`` and ``acc_lost`` (trained chip minus the mean over unseen chips and
    sweep) for every trained run; ``sharpness`` (lambda_max) is already in the row."""
    for r in rows:
        if r["status"] != "ok":
            continue
        r["worst_loss"] = worst_case_loss_of(r["run_dir"])
        perturbed = [v for k, v in r.items() if k.startswith(("unseen_", "sweep_"))]
        r["acc_lost"] = r["acc_chip"] - float(np.mean(perturbed)) if perturbed else None


def parse(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="digits, mzi N=32 (the default)")
    mode.add_argument("--full", action="store_true", help="N=64, fashion-mnist if present")
    ap.add_argument("--out", default="docs", help="where paper.md and its figures go")
    ap.add_argument("--runs", default="runs/paper", help="where the trained runs go")
    ap.add_argument("--methods", help="comma-separated subset of the methods (a smoke run)")
    ap.add_argument("--budget", type=int, help="device settings per run")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--task")
    ap.add_argument("--n-modes", type=int)
    ap.add_argument("--set", action="append", default=[], help="key=value for every method")
    ap.add_argument(
        "--sections", help="comma-separated subset of table1,mrr,freespace ('' for none)"
    )
    ap.add_argument(
        "--rho-sweep", help="the rho sweep's devices, comma-separated (mzi, mrr), or none"
    )
    ap.add_argument("--label", default="", help="a line put at the top of paper.md")
    a = ap.parse_args(argv)
    p: dict[str, Any] = dict(PRESETS["full" if a.full else "quick"])
    if a.full and p["task"] == "fashion-mnist":
        from blackbox_sat.data.idx import find_fashion_mnist

        try:
            find_fashion_mnist()
        except Exception:
            p["task"] = "digits"  # N=64 on digits only
    for k in ("budget", "seeds", "workers", "task", "n_modes"):
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    if a.rho_sweep is not None:
        p["rho"] = tuple(d for d in a.rho_sweep.split(",") if d not in ("", "none"))
        if unknown := set(p["rho"]) - set(RHO_METHODS):
            ap.error(
                f"--rho-sweep: no sweep for {sorted(unknown)}; choose from {sorted(RHO_METHODS)}"
            )
    p["methods"] = None if a.methods is None else a.methods.split(",")
    p["sections"] = None if a.sections is None else [x for x in a.sections.split(",") if x]
    pairs = [kv.split("=", 1) for kv in a.set]
    p["set"] = {k: json.loads(v) if v[:1] in "[{" else v for k, v in pairs}
    shown = [x for x, prev in zip(argv, ["", *argv]) if x != "--label" and prev != "--label"]
    p.update(out=Path(a.out), runs=Path(a.runs), label=a.label, argv=shlex.join(shown))
    return p


def main(argv: list[str] | None = None) -> Path:
    p = parse(sys.argv[1:] if argv is None else argv)
    plan = {k: v for k, v in sections(p).items() if p["sections"] is None or k in p["sections"]}
    if p["methods"] is not None:
        p_est = {
            k: (d, kw, c, [m for m in ms if m in p["methods"]], s)
            for k, (d, kw, c, ms, s) in plan.items()
        }
    else:
        p_est = plan
    print(
        f"reproduce_paper: estimated {estimate_s(p, p_est) / 60:.0f} min on 2 cores "
        f"(task {p['task']}, mzi N={p['n_modes']}, budget {p['budget']}, seeds {p['seeds']})",
        flush=True,
    )
    t0 = time.perf_counter()
    rows = []
    for name, spec in plan.items():
        rows += run_section(name, spec, p, p["runs"])
    if p["rho"]:
        rows += run_rho_sweep(p, p["runs"])
    add_transfer(rows)
    add_flatness(rows)
    p["out"].mkdir(parents=True, exist_ok=True)
    label = f"**{p['label']}**\n\n" if p["label"] else ""
    path = write_markdown(rows, p, time.perf_counter() - t0, p["out"], label)
    print(f"wrote {path} in {(time.perf_counter() - t0) / 60:.1f} min")
    return path


if __name__ == "__main__":
    main()
