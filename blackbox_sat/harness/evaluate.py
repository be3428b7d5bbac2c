"""``evaluate``: accuracy of a trained run on any device instance.

It rebuilds the PNN from ``model.json`` (encoding, the frozen gain, digital layers) and
``theta.npy``, and measures the test set through the device's ``query``. The gain is
never re-measured, so a drifted or unseen chip is judged exactly as deployed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import MeteredDevice
from blackbox_sat.devices.spec import load_device, public_kw
from blackbox_sat.training.pnn import PNN

from .run import run_device


def load_run(run) -> tuple[PNN, np.ndarray, dict]:
    """``run``: a run directory or the dict ``train`` returned (with its ``out``)."""
    path = Path(run["out"] if isinstance(run, dict) else run)
    missing = [n for n in ("model.json", "theta.npy", "config.json") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a finished run directory (missing {', '.join(missing)})"
        )
    pnn = PNN.from_dict(json.loads((path / "model.json").read_text()))
    return pnn, np.load(path / "theta.npy"), json.loads((path / "config.json").read_text())


def _task_of(task: str, run: Path) -> str:
    """The run's task; a relative file path (runs written before paths were stored absolute)
    is read from where it was, else from the run folder's own copy."""
    if Path(task).suffix != ".npz" or Path(task).exists():
        return task
    own = run / Path(task).name
    return str(own) if own.exists() else task


def evaluate(
    run, device=None, device_kw: dict | None = None, ledger: str | Path | None = None
) -> dict:
    """Test accuracy of ``run`` on ``device`` (object or spec; default: the training device).

    Returns ``{"accuracy", "n_test", "settings", "device", "device_kw"}`` (``device_kw``
    without secrets such as a token).
    """
    pnn, theta, cfg = load_run(run)
    path = Path(run["out"] if isinstance(run, dict) else run)
    if device is None:
        device = run_device(cfg, None, f"evaluate({str(path)!r}, device=...)", "evaluate")
        device_kw = {**cfg["device_kw"], **(device_kw or {})}
    source = load_device(device, **(device_kw or {}))
    data = load_task(_task_of(cfg["task"], path))
    book = Ledger(ledger) if ledger is not None else None
    metered = MeteredDevice(source, book, budget=None, replay=False)
    with torch.no_grad():
        x = pnn.device_inputs(pnn.features(data.x_test)).numpy()
        y = metered.query(theta, x, purpose="eval")
        pred = pnn(torch.as_tensor(y)).argmax(1).numpy()
    if book is not None:
        book.close()
    return {
        "accuracy": float(np.mean(pred == data.y_test)),
        "n_test": len(data.y_test),
        "settings": metered.eval_settings,
        "device": device if isinstance(device, str) else type(device).__name__,
        "device_kw": public_kw(device_kw),  # a token is used, never returned
    }
