"""``train``: one run of one method on one device, with its files.

A run directory holds ``config.json`` (written first: everything needed to resume),
``ledger.sqlite`` (every query), and on success ``result.json``, ``model.json`` (encoding,
frozen gain, digital layers) and ``theta.npy``. ``result.json`` appears last and
atomically, so its presence means the run finished.

Resume re-executes the run deterministically from its config while the metered device
replays the ledger (see :mod:`.devices.metered`): no query is paid for twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import InvalidInput, MissingCapability, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import MeteredDevice
from blackbox_sat.devices.spec import load_device
from blackbox_sat.methods.registry import get_method
from blackbox_sat.optim.sharpness import top_hessian_eigenvalue
from blackbox_sat.training.config import as_dict, build
from blackbox_sat.training.context import TrainContext
from blackbox_sat.training.pnn import CALIBRATION_INPUTS, PNN, calibrate_gain

#: Device keywords never written to config.json, the ledger or result.json (a resumed run
#: reads the token from $BLACKBOX_SAT_TOKEN instead).
SECRET_DEVICE_KW = ("token",)


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
    one when None). ``init_from``: another run's directory: start from its ``theta`` and
    readout gain (no gain setting is spent) and, for the twin methods, its ``calibration.pt``.
    """
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="blackbox-sat-"))
    if (out / "result.json").exists() and not overwrite:
        raise RunExists(f"{out} already holds a finished run; pick another --out, or evaluate it")
    if (out / "ledger.sqlite").exists() and not overwrite:
        raise RunExists(
            f"{out} holds an unfinished run; continue it with `blackbox-sat train --resume {out}`"
        )
    cfg = method_config(method, config)
    device_kw = dict(device_kw or {})
    secret_kw = {k: device_kw.pop(k) for k in SECRET_DEVICE_KW if k in device_kw}
    run_cfg = {
        "method": method,
        "task": task if isinstance(task, str) else None,
        "budget": int(budget),
        "seed": int(seed),
        "device": device if isinstance(device, str) else type(device).__name__,
        "device_kw": device_kw,
        "config": as_dict(cfg),
    }
    if init_from is not None:
        run_cfg["init_from"] = str(Path(init_from).resolve())
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in ("result.json", "ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
            (out / name).unlink(missing_ok=True)
    if not isinstance(task, str):  # keep the user's arrays with the run, so it can be resumed
        names = ("x_train", "y_train", "x_test", "y_test")
        np.savez(out / "task.npz", **dict(zip(names, task)))
        task = run_cfg["task"] = str(out / "task.npz")
    write_json_atomic(out / "config.json", run_cfg)
    return _execute(device, task, run_cfg, out, progress, secret_kw)


def resume(out: str | Path, device=None, progress: bool = True) -> dict:
    """Continue a killed run in ``out`` from its ledger (``train --resume``)."""
    out = Path(out)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if not (out / "config.json").exists():
        raise FileNotFoundError(f"{out} has no config.json: it is not a resumable run directory")
    run_cfg = json.loads((out / "config.json").read_text())
    return _execute(
        device if device is not None else run_cfg["device"], run_cfg["task"], run_cfg, out, progress
    )


def _execute(
    device, task, run_cfg: dict, out: Path, progress: bool, secret_kw: dict | None = None
) -> dict:
    t_start = time.perf_counter()
    seed, budget = run_cfg["seed"], run_cfg["budget"]
    spec = get_method(run_cfg["method"])
    cfg = build(spec.config, run_cfg["config"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    source = load_device(device, **run_cfg["device_kw"], **(secret_kw or {}))
    info = describe(source)
    data = load_task(task)
    ledger = Ledger(out / "ledger.sqlite")
    ledger.set_meta("config", run_cfg)
    metered = MeteredDevice(source, ledger, budget=0 if spec.model_based else budget)
    if callable(
        getattr(source, "bind_ledger", None)
    ):  # request ids that survive a kill (devices/remote.py)
        source.bind_ledger(ledger)
    pnn = PNN.build(data.x_train, data.n_classes, info, mode=cfg.pnn)
    theta0 = info.start(seed)
    f_train = pnn.features(data.x_train)
    init = _init_from(run_cfg.get("init_from"), info)
    if init:
        theta0 = init["theta"]
        pnn.gain.fill_(init["gain"])
    elif spec.model_based:
        model = getattr(source, "true_model" if spec.needs == "true" else "nominal_model", None)
        if model is None:
            raise MissingCapability(
                f"method {spec.name!r} needs the device's {spec.needs}_model(); "
                f"{type(source).__name__} is a black-box device. Use a device-query method"
            )
        with torch.no_grad():
            x_cal = pnn.device_inputs(f_train[:CALIBRATION_INPUTS])
            y_cal = model()(torch.as_tensor(theta0), x_cal).numpy()
    else:
        x_cal = pnn.device_inputs(f_train[:CALIBRATION_INPUTS]).detach().numpy()
        y_cal = metered.query(theta0, x_cal, purpose="calibrate")
    if not init:
        pnn.gain.fill_(calibrate_gain(y_cal, data.n_classes))

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
        progress=bar,
        init_calibration=init.get("calibration"),
    )
    t_train = time.perf_counter()
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
        "config": as_dict(cfg),
        "extra": outcome.extra,
        "out": str(out),
    }
    np.save(out / "theta.npy", theta)
    for name, write in outcome.files.items():
        write(out / name)
    write_json_atomic(out / "model.json", pnn.to_dict())
    write_json_atomic(out / "result.json", result)
    ledger.close()
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
