"""``collect`` and ``fit-surrogate``: designed queries into a ledger, and surrogates fit from it.

``collect`` measures a designed set of settings (a trust region around a centre, or Sobol
over the whole box) on training inputs of a task, into ``DIR/ledger.sqlite`` (purpose
``probe``), with the centre in ``DIR/centre.npy``. Re-run into the same ``DIR`` after a kill,
it replays the ledger and pays only for the settings not yet measured.

``fit_surrogate`` fits one surrogate family on a ledger, holding out whole settings, and
reports its held-out error. Given the simulator the ledger came from, it also reports the
held-out R² of the part of the output that ``theta`` changes, ``y(theta, x) - y(theta_c, x)``
(a model that ignores ``theta`` scores about 0), the cosine between the surrogate's and
the true model's loss gradients at the centre, and ``true_grad_turn``: the mean cosine between
the true gradient at the centre and at held-out settings: how much the gradient turns across
the region the data cover, i.e. how much curvature a model must get right.

``kind="calibrated"`` / ``"calibrated+residual"`` fit a physical model's error parameters
(``surrogate_kw["model"]``: ``package.module:function``, or the simulator's own
``calibration_model()``); the report adds the calibration's own held-out error against the
datasheet's and, on a simulator, each identified parameter's rms error against the truth
(``report["calibration"]``). For every kind, ``report["warnings"]`` says what to change
when the held-out R² of the theta-driven change is below ``DELTA_R2_WARN``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import InvalidInput, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import MeteredDevice
from blackbox_sat.devices.spec import load_device, public_kw
from blackbox_sat.training.calibrate import resolve_calibration_model, twin_report
from blackbox_sat.training.pnn import CALIBRATION_INPUTS, PNN, calibrate_gain
from blackbox_sat.training.surrogate_choice import heldout_scores
from surrogates import design_settings, inputs_per_setting, make_surrogate, space_filling


def collect(
    device,
    settings: int,
    out,
    around: np.ndarray | None = None,
    radius: float = 0.05,
    inputs: int = 64,
    task="digits",
    seed: int = 0,
    device_kw: dict | None = None,
) -> dict:
    """Measure ``settings`` designed settings into ``out/ledger.sqlite``.

    ``around (n_params,)``: centre of the trust region (L-inf ``radius`` in bound widths);
    None: Sobol over the whole box. Each setting measures ``inputs`` training inputs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_device(device, **(device_kw or {}))
    info = describe(source)
    data = load_task(task)
    pnn = PNN.build(data.x_train, data.n_classes, info)
    pool = pnn.device_inputs(pnn.features(data.x_train)).numpy()
    if around is None:
        thetas = space_filling(settings, info.low, info.high, seed)
        centre = info.start(seed)
    else:
        centre = np.asarray(around, float)
        thetas = design_settings(
            centre,
            radius,
            settings,
            info.low,
            info.high,
            global_fraction=0.0,
            periodic=info.periodic,
            seed=seed,
        ).settings
    xs = inputs_per_setting(pool, len(thetas), min(inputs, len(pool)), np.random.default_rng(seed))
    t0 = time.perf_counter()
    with Ledger(out / "ledger.sqlite") as ledger:
        # Replay, as ``train --resume`` does: a collect re-run after a kill takes the settings
        # already in the ledger from it, and the query in flight at the kill from the server's
        # journal (the meter binds request ids to the ledger), so nothing is paid twice.
        meter = MeteredDevice(source, ledger)
        for theta, x in zip(thetas, xs):
            meter.query(info.project(theta), x, purpose="probe")
        ledger.set_meta(
            "collect",
            {
                "device": device if isinstance(device, str) else type(device).__name__,
                "device_kw": public_kw(device_kw),
                "settings": settings,
                "radius": radius,
                "inputs": inputs,
                "task": task,
                "seed": seed,
                "random": around is None,
            },
        )
    np.save(out / "centre.npy", centre)
    return {
        "settings": meter.settings_used,
        "samples": meter.samples_used,
        "wall_s": time.perf_counter() - t0,
        "ledger": str(out / "ledger.sqlite"),
    }


TURN_SETTINGS = 8  # held-out settings at which the true gradient is compared with the centre's


def _loss_grad(
    model, theta: np.ndarray, x: torch.Tensor, labels: torch.Tensor, pnn: PNN
) -> np.ndarray:
    th = torch.tensor(theta, dtype=torch.float32, requires_grad=True)
    loss = F.cross_entropy(pnn(model(th, x).double()), labels)
    return torch.autograd.grad(loss, th)[0].double().numpy()


def fit_surrogate(
    ledger_path,
    kind: str = "hyper",
    out=None,
    device=None,
    device_kw: dict | None = None,
    centre: np.ndarray | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    task: str | None = None,
    surrogate_kw: dict | None = None,
    threads: int = 1,
) -> dict:
    """Fit ``kind`` on a ledger's good rows; return held-out metrics (and save to ``out``).

    ``task``: the task whose training inputs give the loss-gradient cosine (default: the one
    the ledger was collected on). ``threads``: torch threads (1 by default, as for trials:
    reproducible, and faster than an oversubscribed pool on a small machine)."""
    torch.set_num_threads(threads)
    with Ledger(ledger_path) as ledger:
        theta, x, y, groups = ledger.samples()
        meta = ledger.get_meta("collect", {}) or {}
    task = task or meta.get("task", "digits")
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    held = np.isin(groups, rng.choice(ids, max(1, int(holdout * len(ids))), replace=False))
    if device is None and meta.get("device"):
        device, device_kw = meta["device"], meta.get("device_kw", {})
    source = load_device(device, **(device_kw or {})) if device is not None else None
    info = describe(source) if source is not None else None
    kw = dict(surrogate_kw or {})
    if info is not None:
        kw.update(theta_low=info.low, theta_high=info.high, periodic=info.periodic)
    calibrated = kind.startswith("calibrated")
    if calibrated:  # a grey-box fit: the user's physical model (or the simulator's own)
        spec = kw.pop("model", None)
        if source is None and spec in (None, "device"):
            raise InvalidInput(
                f"--kind {kind} needs a calibration model: --set model=package.module:function "
                "(or --device of a simulator that has calibration_model())"
            )
        kw["model"] = resolve_calibration_model(source, spec)
    sur = make_surrogate(kind, seed=seed, **kw)
    t0 = time.perf_counter()
    sur.fit(theta[~held], x[~held], y[~held], groups[~held])
    fit_s = time.perf_counter() - t0
    scores = heldout_scores(sur, theta[held], x[held], y[held])
    report = {
        "kind": kind,
        "rows": len(y),
        "settings": len(ids),
        "heldout_settings": int(held.sum() and len(np.unique(groups[held]))),
        "fit_s": fit_s,
        "heldout_r2": scores["r2"],
        "heldout_rmse": scores["rmse"],
        "heldout_delta_r2": scores["delta_r2"],  # the pipeline's selection score
    }
    if calibrated:
        report["calibration"] = twin_report(sur, source)
    getter = getattr(source, "true_model", None)
    if getter is not None:
        report.update(
            _simulator_metrics(sur, getter(), info, theta[held], x[held], centre, ledger_path, task)
        )
    report["warnings"] = fit_warnings(report)
    if out is not None:
        sur.save(out)
        report["saved"] = str(out)
    return report


def _simulator_metrics(sur, true, info, theta_h, x_h, centre, ledger_path, task) -> dict:
    """Held-out R² of ``y(theta,x) - y(theta_c,x)``, the loss-gradient cosine at the centre, and
    the true gradient's turn between the centre and held-out settings."""
    if centre is None:
        p = Path(ledger_path).parent / "centre.npy"
        centre = np.load(p) if p.exists() else theta_h.mean(0)
    th_h, xs = torch.as_tensor(theta_h), torch.as_tensor(x_h)
    c = torch.as_tensor(centre, dtype=torch.float64)
    settings, which = np.unique(theta_h, axis=0, return_inverse=True)
    with torch.no_grad():
        y_true = torch.empty(len(x_h), true(c, xs[:1]).shape[1], dtype=torch.float64)
        for k, s in enumerate(settings):  # one true-model call per held-out setting
            rows = torch.as_tensor(np.flatnonzero(which.ravel() == k))
            y_true[rows] = true(torch.as_tensor(s), xs[rows])
        dy = y_true - true(c, xs)
        p = (
            sur.predict(th_h.float(), xs.float()).double()
            - sur.predict(c.float(), xs.float()).double()
        )
    r2_delta = float(1 - ((p - dy) ** 2).sum() / (dy**2).sum())
    data = load_task(task)
    pnn = PNN.build(data.x_train, data.n_classes, info)
    xt = pnn.device_inputs(pnn.features(data.x_train[:256]))
    with torch.no_grad():
        pnn.gain.fill_(calibrate_gain(true(c, xt[:CALIBRATION_INPUTS]).numpy(), data.n_classes))
    labels = torch.as_tensor(data.y_train[:256])
    g_true = _loss_grad(true, centre, xt.float(), labels, pnn)
    g_sur = _loss_grad(sur.predict, centre, xt.float(), labels, pnn)
    # How far the true gradient turns across the data. Near 1, slopes seen anywhere in the
    # region give the centre's gradient; low, the model must get the curvature right too,
    # at the scale of the data's spread (a hard target, not a bound on the cosine).
    spread = settings[:: max(1, len(settings) // TURN_SETTINGS)][:TURN_SETTINGS]
    turn = [_cosine(g_true, _loss_grad(true, s, xt.float(), labels, pnn)) for s in spread]
    return {
        "heldout_r2_delta": r2_delta,
        "grad_cosine": _cosine(g_true, g_sur),
        "true_grad_norm": float(np.linalg.norm(g_true)),
        "true_grad_turn": float(np.mean(turn)),
    }


#: Held-out R² of the theta-driven change below which a surrogate is called uninformative.
DELTA_R2_WARN = 0.2


def fit_warnings(report: dict) -> list[str]:
    """What to change when the fit predicts little of how ``theta`` moves the outputs."""
    r2 = report.get("heldout_r2_delta")
    if r2 is None or not r2 < DELTA_R2_WARN:
        return []
    return [
        f"held-out R² of the theta-driven output change is {r2:.2f} (near zero or below): "
        f"the {report['kind']} surrogate does not predict how theta moves the outputs, so its "
        "gradients are no better than guesses. Change one of: the design's radius (collect "
        "--radius: smaller for a local model, or --random over the whole range for a global "
        "one), more settings (collect --settings), or another kind (calibrated with a "
        "physical model, --set model=package.module:function; interferometric for phases)"
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def write_report(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
