"""Shared test settings: one torch thread, as every trial runs (a 2-core CI box is easily
oversubscribed, and tiny simulator matmuls then take milliseconds instead of microseconds)."""

import inspect
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import describe
from blackbox_sat.devices.metered import BudgetExhausted, MeteredDevice
from blackbox_sat.methods import get_method
from blackbox_sat.sim import BUILTINS
from blackbox_sat.sim.mrr import mrr
from blackbox_sat.training.config import build
from blackbox_sat.training.context import TrainContext
from blackbox_sat.training.pnn import CALIBRATION_INPUTS, PNN, calibrate_gain

torch.set_num_threads(1)


# --- shared helpers (imported by test modules; no test module imports another) ---
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
QUIET = {"in_dim": 4, "out_dim": 3, "noise": 0.0, "programming_noise": 0.0}


def mrr4(**kw):
    """The small served device of these tests: an MRR bank with 4 inputs and 3 outputs."""
    return BUILTINS["mrr"](**{"in_dim": 4, "out_dim": 3, **kw})


class Faulty:
    """Wraps a device; after ``after`` good calls it misbehaves as ``mode``:
    ``raise``, ``nan``, ``shape``, ``hang`` (until ``release`` is set) or ``gate`` (signals
    ``reached`` and waits for ``release``, then answers normally). ``mode=None``: healthy."""

    def __init__(self, device, mode=None, after=0, delay=0.0):
        self.device, self.mode, self.after, self.delay = device, mode, after, delay
        for name in (
            "n_params",
            "in_dim",
            "out_dim",
            "bounds",
            "periodic",
            "input_bounds",
            "theta0",
            "max_batch",
        ):
            if hasattr(device, name):
                setattr(self, name, getattr(device, name))
        self.calls = self.active = self.max_active = 0
        self.reached, self.release = threading.Event(), threading.Event()

    def query(self, theta, x):
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            return self._answer(theta, x)
        finally:
            self.active -= 1

    def _answer(self, theta, x):
        y = self.device.query(theta, x)
        if self.mode is None or self.calls <= self.after:
            return y
        if self.mode == "raise":
            raise OSError("instrument timeout on channel 3")
        if self.mode == "nan":
            y = y.copy()
            y[0, 0] = np.nan
            return y
        if self.mode == "shape":
            return y[:, :-1]
        if self.mode in ("hang", "gate"):
            self.mode = None if self.mode == "gate" else self.mode
            self.reached.set()
            self.release.wait(30)
        return y


def start_server_process(
    tmp_path: Path,
    device=("mrr", "in_dim=4", "out_dim=3"),
    port: int = 0,
    journal: Path | None = None,
    extra=(),
    name="server",
):
    """``blackbox-sat serve-device`` as a subprocess; returns ``(proc, url)``."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    spec, *kws = device
    cmd = [
        sys.executable,
        "-m",
        "blackbox_sat.cli",
        "serve-device",
        "--device",
        spec,
        "--port",
        str(port),
        "--token-file",
        str(token_file),
        "--journal",
        str(journal or tmp_path / "journal.sqlite"),
        *extra,
    ]
    for kw in kws:
        cmd += ["--device-kw", kw]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BLACKBOX_SAT_TOKEN", None)
    with open(tmp_path / f"{name}.log", "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, env=env)
    line = (
        proc.stdout.readline().decode()
    )  # "listening on tcp://127.0.0.1:PORT", printed once bound
    m = re.search(r"listening on (tcp://\S+)", line)
    if not m:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"server did not start: {line!r}\n{(tmp_path / f'{name}.log').read_text()}"
        )
    return proc, m.group(1)


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it holds; ``timeout`` is a generous bound that only turns a
    hang into a failure (the test never depends on how long the wait takes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached within {timeout:g} s")
        time.sleep(0.02)  # the poll interval


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def slow_mrr4(delay=0.004, **kw):
    """Factory for subprocess servers (``tests.conftest:slow_mrr4``): mrr4 taking ``delay`` s a call."""
    return Faulty(mrr4(**kw), delay=delay)


def make_ctx(
    device, task="iris", budget=400, seed=0, config=None, method="spsa", pnn_mode="device"
) -> TrainContext:
    """The context ``train`` builds, without files: metered device (no ledger), PNN
    (``pnn_mode``) with the gain calibrated on the device (1 setting), encoded data."""
    info = describe(device)
    data = load_task(task)
    pnn = PNN.build(data.x_train, data.n_classes, info, pnn_mode)
    metered = MeteredDevice(device, None, budget=budget)
    theta0 = info.start(seed)
    f_train = pnn.features(data.x_train)
    with torch.no_grad():
        x_cal = pnn.device_inputs(f_train[:CALIBRATION_INPUTS]).numpy()
    pnn.gain.fill_(
        calibrate_gain(metered.query(theta0, x_cal, purpose="calibrate"), data.n_classes)
    )
    return TrainContext(
        metered,
        device,
        pnn,
        f_train,
        data.y_train,
        pnn.features(data.x_val),
        data.y_val,
        pnn.features(data.x_test),
        data.y_test,
        theta0,
        seed,
        build(get_method(method).config, config),
        budget,
    )


def fail_after(ctx: TrainContext, monkeypatch, n: int) -> dict:
    """Make ``ctx.device`` raise ``BudgetExhausted`` after ``n`` queries (someone else spent
    the budget); returns the call counter, which a test may reset."""
    real, calls = ctx.device.query, {"n": 0}

    def flaky(theta, x, purpose="train"):
        calls["n"] += 1
        if calls["n"] > n:
            raise BudgetExhausted("someone else spent the budget")
        return real(theta, x, purpose=purpose)

    monkeypatch.setattr(ctx.device, "query", flaky)
    return calls


def record_refine_queries(ctx: TrainContext, monkeypatch) -> list:
    """The settings ``ctx.device`` is queried at with purpose ``refine``, in order."""
    real, queried = ctx.device.query, []

    def record(theta, x, purpose="train"):
        if purpose == "refine":
            queried.append(np.asarray(theta, float).copy())
        return real(theta, x, purpose=purpose)

    monkeypatch.setattr(ctx.device, "query", record)
    return queried


def true_loss(ctx: TrainContext, theta) -> float:
    """Noise-free training loss on the whole training set, through the chip's true model."""
    model = ctx.source.true_model()
    with torch.no_grad():
        x = ctx.pnn.device_inputs(ctx.f_train)
        y = model(torch.as_tensor(np.asarray(theta, float)), x)
        return float(F.cross_entropy(ctx.pnn(y), torch.as_tensor(ctx.y_train)))


def assert_meets_protocol(obj, protocol) -> None:
    """What ``isinstance(obj, protocol)`` cannot check (for a runtime-checkable protocol it
    only asks that the names exist): each method takes the protocol's parameters under the
    same names, kinds and optionality, so a renamed or dropped keyword fails here."""
    members = [n for n in vars(protocol) if not n.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    assert members, f"{protocol.__name__} declares no members"
    for name in members:
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {name}"
        declared = getattr(protocol, name, None)
        if not callable(declared):
            continue
        want = inspect.signature(declared).parameters
        have = inspect.signature(getattr(obj, name)).parameters
        for pname, p in want.items():
            if pname in ("self", "cls"):
                continue
            assert pname in have, f"{type(obj).__name__}.{name} has no parameter {pname!r}"
            q = have[pname]
            assert q.kind == p.kind, (
                f"{type(obj).__name__}.{name}({pname}) is {q.kind}, not {p.kind}"
            )
            assert (q.default is q.empty) == (p.default is p.empty), (
                f"{type(obj).__name__}.{name}({pname}): optional in one, required in the other"
            )


def small_mrr(**kw):
    return mrr(in_dim=8, out_dim=4, seed=0, **kw)  # default read, programming and DAC noise


# --- the objective --------------------------------------------------------------------
