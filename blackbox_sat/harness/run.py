"""``train``: one run of one method on one device, with its files.

A run directory holds ``config.json`` (written first: everything needed to resume),
``ledger.sqlite`` (every query), and on success ``result.json``, ``model.json`` (encoding,
frozen gain, digital layers) and ``theta.npy``. ``result.json`` appears last and
atomically, so its presence means the run finished.

Resume re-executes the run deterministically from its config while the metered device
replays the ledger (see :mod:`.devices.metered`): no query is paid for twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import InvalidInput, MissingCapability, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import BudgetExhausted, MeteredDevice
from blackbox_sat.devices.scale import measure_scale
from blackbox_sat.devices.spec import (
    SECRET_DEVICE_KW,
    load_device,
    module_home,
    public_kw,
    search_also,
)
from blackbox_sat.methods.registry import get_method, missing
from blackbox_sat.optim.sharpness import top_hessian_eigenvalue
from blackbox_sat.sim import BUILTINS
from blackbox_sat.training.config import as_dict, build
from blackbox_sat.training.context import TrainContext
from blackbox_sat.training.pnn import CALIBRATION_INPUTS, PNN, calibrate_gain


class RunExists(FileExistsError):
    """The output directory already holds a run."""


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def method_config(method: str, overrides: dict | None) -> Any:
    """``method``'s configuration: its defaults with ``overrides`` (dotted keys) applied.

    Raises :class:`~blackbox_sat.training.config.ConfigError` on an unknown key or a bad value."""
    return build(get_method(method).config, overrides)


def train(
    device,
    task="digits",
    method: str = "blackbox-sat",
    budget: int = 2000,
    seed: int = 0,
    out: str | Path | None = None,
    device_kw: dict | None = None,
    config: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    init_from: str | Path | None = None,
) -> dict:
    """Train ``method`` on ``device`` (object or spec string) and return ``result.json``'s dict.

    ``task``: a name, an ``.npz`` path or ``(x_train, y_train, x_test, y_test)``.
    ``config``: method hyperparameters (``--set``). ``out``: run directory (a temporary
    one when None). Every input is checked before ``out`` is created or the device queried;
    a run that fails before training starts leaves no folder behind. ``overwrite``: replace
    a run already in ``out``. ``init_from``: another run's directory: start from its
    ``theta`` and readout gain (no gain setting is spent) and, for the twin methods, its
    ``calibration.pt``.
    """
    out = Path(out) if out is not None else None
    if out is not None and not overwrite:
        if (out / "result.json").exists():
            raise RunExists(
                f"{out} already holds a finished run; pick another --out, pass --overwrite, "
                "or evaluate it"
            )
        if (out / "ledger.sqlite").exists():
            raise RunExists(
                f"{out} holds an unfinished run; continue it with `blackbox-sat train --resume "
                f"{out}`, or pass --overwrite to start afresh"
            )
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise InvalidInput(f"budget must be an int >= 1 (device settings), got {budget!r}")
    device_kw, secret_kw = _split_secrets(device_kw)
    if isinstance(task, str) and Path(task).suffix == ".npz":
        task = str(Path(task).resolve())  # absolute, so the run works from any folder
    run_cfg = {
        "method": method,
        "task": task if isinstance(task, str) else None,
        "budget": int(budget),
        "seed": int(seed),
        "device": device if isinstance(device, str) else type(device).__name__,
        "device_object": not isinstance(device, str),
        "device_kw": device_kw,
        "config": {},
    }
    if init_from is not None:
        run_cfg["init_from"] = str(Path(init_from).resolve())
    prepared = _prepare(device, task, run_cfg, config, secret_kw)
    run_cfg["config"] = as_dict(prepared.cfg)
    run_cfg["device_path"] = module_home(device)  # so evaluate finds an adapter from anywhere
    out = out if out is not None else Path(tempfile.mkdtemp(prefix="blackbox-sat-"))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written = ["config.json", *LEDGER_FILES]
    if overwrite:
        for name in ("result.json", "model.json", "theta.npy", "task.npz", *LEDGER_FILES):
            (out / name).unlink(missing_ok=True)
    if not isinstance(task, str):  # keep the user's arrays with the run, so it can be resumed
        names = ("x_train", "y_train", "x_test", "y_test")
        np.savez(out / "task.npz", **dict(zip(names, task)))
        run_cfg["task"] = str((out / "task.npz").resolve())
        written.append("task.npz")
    write_json_atomic(out / "config.json", run_cfg)
    started: list[bool] = []
    try:
        return _execute(prepared, run_cfg, out, progress, started)
    except BaseException:
        if not started:  # setup failed: nothing worth resuming, so leave no folder behind
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for name in written:
                    (out / name).unlink(missing_ok=True)
        raise


#: The ledger's files (SQLite write-ahead log included).
LEDGER_FILES = ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm")


def resume(
    out: str | Path, device=None, progress: bool = True, device_kw: dict | None = None
) -> dict:
    """Continue a killed run in ``out`` from its ledger (``train --resume``).

    The run continues exactly as configured in ``config.json``. ``device`` and ``device_kw``
    say where the device is now (needed for a run trained on a device object, or a server
    restarted on another port): a spec string and keywords replace the stored ones, in
    config.json too, so that a later ``evaluate`` finds the device where it is."""
    out = Path(out)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if not (out / "config.json").exists():
        raise FileNotFoundError(f"{out} has no config.json: it is not a resumable run directory")
    run_cfg = json.loads((out / "config.json").read_text())
    device = run_device(run_cfg, device, f"resume({str(out)!r}, device=...)", "train --resume")
    if device_kw and not isinstance(device, str):
        raise InvalidInput("device keywords only apply to a device spec, not to a device object")
    new_kw, secret_kw = _split_secrets(device_kw)
    if isinstance(device, str) and (device != run_cfg["device"] or new_kw):
        run_cfg["device"] = device
        run_cfg["device_kw"] = {**run_cfg["device_kw"], **new_kw}
        write_json_atomic(out / "config.json", run_cfg)
    kw = run_cfg["device_kw"] if isinstance(device, str) else {}
    prepared = _prepare(
        device, run_cfg["task"], {**run_cfg, "device_kw": kw}, run_cfg["config"], secret_kw
    )
    return _execute(prepared, run_cfg, out, progress, [])


def _split_secrets(device_kw: dict | None) -> tuple[dict, dict]:
    """``(public, secret)`` parts of device keywords: only the public part is ever written."""
    kw = dict(device_kw or {})
    return public_kw(kw), {k: kw[k] for k in SECRET_DEVICE_KW if k in kw}


def run_device(run_cfg: dict, device, python: str, command: str):
    """The device a stored run is used with: ``device`` if given, else the recorded spec.

    A run trained on a device object recorded only its class name, so it needs the device
    passed again; say how, rather than fail on the class name as an unknown spec."""
    if device is not None:
        return device
    search_also(run_cfg.get("device_path"))
    name = run_cfg["device"]
    builtin_or_spec = ":" in name or name.startswith("tcp://") or name in BUILTINS
    if run_cfg.get("device_object") or not builtin_or_spec:
        raise MissingCapability(
            f"this run was trained on a device object ({name}), not a device spec, so pass the "
            f"device: {python} in Python, or `blackbox-sat {command} ... --device "
            "package.module:factory` with a factory that builds it"
        )
    return name


@dataclass
class Prepared:
    """A run's inputs, checked and built before its folder exists or the device is queried."""

    spec: Any
    cfg: Any
    source: Any
    info: Any
    data: Any
    secret_kw: dict


def _prepare(device, task, run_cfg: dict, config, secret_kw: dict) -> Prepared:
    """Check every input of a run without creating files or querying the device: the method
    and its ``--set`` values, the device keywords (by the factory's signature), what the
    method needs of the device, and that the task's classes fit the device's outputs."""
    spec = get_method(run_cfg["method"])
    cfg: Any = build(spec.config, config)
    source = load_device(device, **run_cfg["device_kw"], **secret_kw)
    info = describe(source)
    lacking = missing(spec, source, info, cfg)
    if lacking:
        raise MissingCapability(
            f"method {spec.name!r} needs {' and '.join(lacking)}, which {run_cfg['device']} "
            "lacks; methods that run on the four contract members alone: spsa, ng-cma, ng-ngopt, "
            "ng-tbpsa (README, 'Which methods need what')"
        )
    data = load_task(task)
    if data.n_classes > info.out_dim:
        raise InvalidInput(
            f"task {run_cfg['task'] or 'arrays'!r} has {data.n_classes} classes but "
            f"{run_cfg['device']} has only {info.out_dim} outputs (out_dim); the first n_classes "
            "outputs carry the classes: choose a task with fewer classes or a device with more outputs"
        )
    return Prepared(spec, cfg, source, info, data, secret_kw)


def _execute(p: Prepared, run_cfg: dict, out: Path, progress: bool, started: list) -> dict:
    """Calibrate, train and write the result files. ``started`` gets an item once training
    begins (from then on the ledger holds a resumable run)."""
    t_start = time.perf_counter()
    if p.cfg.threads:
        torch.set_num_threads(p.cfg.threads)
    torch.manual_seed(run_cfg["seed"])
    ledger = Ledger(out / "ledger.sqlite")
    try:
        return _train_in(p, run_cfg, out, progress, started, ledger, t_start)
    finally:
        ledger.close()


def _train_in(
    p: Prepared, run_cfg: dict, out: Path, progress: bool, started: list, ledger, t_start: float
) -> dict:
    seed, budget = run_cfg["seed"], run_cfg["budget"]
    spec, cfg, source, info, data = p.spec, p.cfg, p.source, p.info, p.data
    ledger.set_meta("config", run_cfg)
    metered = MeteredDevice(source, ledger, budget=0 if spec.model_based else budget)
    pnn = PNN.build(data.x_train, data.n_classes, info, mode=cfg.pnn)
    theta0 = info.start(seed)
    f_train = pnn.features(data.x_train)
    init = _init_from(run_cfg.get("init_from"), info)
    x_cal = pnn.device_inputs(f_train[:CALIBRATION_INPUTS]).detach()
    x_np = x_cal.numpy()
    if init:
        theta0 = init["theta"]
        pnn.gain.fill_(init["gain"])
    elif spec.model_based:
        getter = "true_model" if spec.needs == "true" else "nominal_model"
        with torch.no_grad():
            y_cal = getattr(source, getter)()(torch.as_tensor(theta0), x_cal).numpy()
    else:
        y_cal = metered.query(theta0, x_np, purpose="calibrate")
    if not init:
        pnn.gain.fill_(calibrate_gain(y_cal, data.n_classes))
    free = ~(np.isfinite(info.low) & np.isfinite(info.high))
    if free.any() and not spec.model_based:  # a unit for parameters without bounds
        try:
            scale = (
                cfg.scale
                or measure_scale(
                    lambda t: metered.query(t, x_np, purpose="calibrate"), theta0, free, seed
                )["scale"]
            )
        except BudgetExhausted:
            raise InvalidInput(
                f"a budget of {budget} settings is too small to measure the step unit of the "
                "parameters without bounds (about 15 settings); raise --budget, or pass "
                "--set scale=<device units>"
            ) from None
        metered.info = info = dataclasses.replace(info, free_scale=scale)

    bar = tqdm(
        total=budget if not spec.model_based else None,
        desc=f"{spec.name} seed={seed}",
        disable=not progress,
        unit="setting",
        leave=False,
    )
    ctx = TrainContext(
        metered,
        source,
        pnn,
        f_train,
        data.y_train,
        pnn.features(data.x_val),
        data.y_val,
        pnn.features(data.x_test),
        data.y_test,
        theta0,
        seed,
        cfg,
        budget,
        progress=bar if progress else None,
        init_calibration=init.get("calibration"),
    )
    started.append(True)
    t_train = time.perf_counter()
    if not spec.model_based:
        ctx.start_curve(theta0)
    outcome = spec.fn(ctx)
    train_s = time.perf_counter() - t_train
    bar.close()
    theta = info.project(outcome.theta)
    if not spec.model_based:
        ctx.snapshot(theta)
        ctx.finish_curve(theta)
    acc = ctx.device_accuracy(theta, "test", "eval")
    val_acc = ctx.device_accuracy(theta, "val", "eval")
    counts = ledger.counts()
    result = {
        "method": spec.name,
        "task": run_cfg["task"],
        "device": run_cfg["device"],
        "device_kw": run_cfg["device_kw"],
        "seed": seed,
        "budget": budget,
        "model_based": spec.model_based,
        "n_classes": data.n_classes,
        "chance": 1 / data.n_classes,
        "accuracy": acc,
        "val_accuracy": val_acc,
        "settings_used": counts["settings"],
        "samples_used": counts["samples"],
        "eval_settings": counts["eval_settings"],
        "bad_queries": counts["bad"],
        "replayed_settings": metered.replayed,
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "device_s": metered.device_time,
        "curve": ctx.curve,
        "sharpness": _sharpness(ctx, theta),
        "gain": float(pnn.gain),
        "free_scale": info.free_scale,  # the unit of unbounded parameters (None: bounded)
        "config": as_dict(cfg),
        "extra": outcome.extra,
        "out": str(out.resolve()),
    }
    np.save(out / "theta.npy", theta)
    for name, write in outcome.files.items():
        write(out / name)
    write_json_atomic(out / "model.json", pnn.to_dict())
    write_json_atomic(out / "result.json", result)
    return result


def _init_from(run_dir: str | None, info) -> dict:
    """``{"theta", "gain", "calibration"}`` of a finished run (``train --init-from``), or {}."""
    if not run_dir:
        return {}
    d = Path(run_dir)
    if not (d / "theta.npy").exists() or not (d / "model.json").exists():
        raise InvalidInput(f"--init-from {d}: not a finished run (no theta.npy / model.json)")
    theta = np.load(d / "theta.npy")
    if theta.shape != (info.n_params,):
        raise InvalidInput(
            f"--init-from {d}: theta has shape {theta.shape}, this device takes ({info.n_params},)"
        )
    cal = d / "calibration.pt"
    return {
        "theta": info.project(theta),
        "gain": json.loads((d / "model.json").read_text())["gain"],
        "calibration": str(cal) if cal.exists() else None,
    }


def _sharpness(ctx: TrainContext, theta: np.ndarray) -> float | None:
    """Top Hessian eigenvalue of the training loss at ``theta`` in normalized coordinates,
    on this chip's true model when the device has one (else None)."""
    getter = getattr(ctx.source, "true_model", None)
    if getter is None:
        return None
    n = min(ctx.config.sharpness_samples, len(ctx.y_train))
    model, scale = getter(), torch.as_tensor(ctx.info.scale)
    with torch.no_grad():
        x = ctx.pnn.device_inputs(ctx.f_train[:n])
    labels = torch.as_tensor(ctx.y_train[:n])

    def loss_fn(th):
        return torch.nn.functional.cross_entropy(ctx.pnn(model(th, x)), labels)

    return float(top_hessian_eigenvalue(loss_fn, torch.as_tensor(theta), scale=scale, iters=20))
