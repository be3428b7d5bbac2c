"""The Ray backend of ``compare``: same rows as the local backend, worker death,
re-runs that skip finished trials, the install message without Ray, and the device gate of
served (``tcp://``) devices.

One local Ray instance (``num_cpus=2``, no dashboard) serves the whole module; its workers
get the repository on ``PYTHONPATH`` so that ``tests.toy_devices`` specs import there.
Trials are tiny: model-based ``offline``/``oracle``, 3 epochs, on a 4-mode ``mzi`` with
``iris``, one unseen chip and a one-point drift sweep.
"""

from __future__ import annotations

import csv
import itertools
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from blackbox_sat.cli import main
from blackbox_sat.harness import backends
from blackbox_sat.harness.compare import Trial, compare

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    task="iris",
    methods=["offline", "oracle"],
    seeds=2,
    budget=100,
    device_kw={"n_modes": 4},
    config={"epochs": 3, "lr_grid": [0.1]},
    unseen=(101,),
    sweep={"drift": [0.5]},
    progress=False,
)
TOKEN = "ray-backend-test-token-0123456789"


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    if started:
        ray.shutdown()


def read_rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def result_mtimes(out: Path) -> dict:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in sorted(out.glob("runs/*/*/result.json"))
    }


def test_ray_gives_the_local_rows_and_reruns_skip(local_ray, tmp_path):
    compare("mzi", out=tmp_path / "local", **TINY)
    remote = compare("mzi", out=tmp_path / "ray", backend="ray", **TINY)
    assert [r["status"] for r in remote["rows"]] == ["ok"] * 4
    a, b = read_rows(tmp_path / "local"), read_rows(tmp_path / "ray")
    assert list(a[0]) == list(b[0])  # same columns, same order
    assert "wall_s" in a[0] and "train_wall_s" in a[0]
    assert untimed(a) == untimed(b)  # every accuracy, count and sharpness, to the last digit
    assert (tmp_path / "ray" / "summary.md").read_text().count("| offline |") == 1
    compare(
        "mzi", out=tmp_path / "pool", workers=2, **TINY
    )  # the local process pool, moved into backends.py
    assert untimed(read_rows(tmp_path / "pool")) == untimed(a)

    before = result_mtimes(tmp_path / "ray")
    assert len(before) == 4
    again = compare("mzi", out=tmp_path / "ray", backend="ray", **TINY)
    assert result_mtimes(tmp_path / "ray") == before  # nothing retrained
    assert untimed(read_rows(tmp_path / "ray")) == untimed(b)
    assert [r["status"] for r in again["rows"]] == ["ok"] * 4


def test_a_killed_worker_is_a_failed_row_and_the_sweep_goes_on(local_ray, tmp_path):
    marker = tmp_path / "killed"
    kw = {**TINY, "device_kw": {"n_modes": 4, "marker": str(marker)}}
    out = tmp_path / "crash"
    res = compare("tests.toy_devices:crash_once", out=out, backend="ray", **kw)
    assert marker.exists()  # one worker was SIGKILLed in its first device query
    failed = [r for r in res["rows"] if r["status"] == "failed"]
    assert len(failed) == 1, res["rows"]
    assert failed[0]["error"].startswith("worker died:"), failed[0]["error"]
    assert sum(r["status"] == "ok" for r in res["rows"]) == 3
    key = f"{failed[0]['method']}-seed{failed[0]['seed']}"
    assert json.loads((out / "trials" / f"{key}.json").read_text())["status"] == "failed"
    assert "## Failed trials" in (out / "summary.md").read_text()

    # Re-running retries only the failed trial (the marker exists now: no second crash).
    before = result_mtimes(out)
    res = compare("tests.toy_devices:crash_once", out=out, backend="ray", **kw)
    assert [r["status"] for r in res["rows"]] == ["ok"] * 4
    after = result_mtimes(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {
        f"runs/{failed[0]['method']}/seed{failed[0]['seed']}/result.json"
    }


def test_without_ray_the_backend_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(backends.BackendUnavailable, match=r"pip install 'blackbox-sat\[ray\]'"):
        compare("mzi", out=tmp_path / "x", backend="ray", **TINY)
    assert not (tmp_path / "x" / "trials").exists()  # nothing ran
    rc = main(
        [
            "compare",
            "--device",
            "mzi",
            "--device-kw",
            "n_modes=4",
            "--task",
            "iris",
            "--methods",
            "offline",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "y"),
            "--set",
            "epochs=3",
            "--set",
            "lr_grid=[0.1]",
            "--backend",
            "ray",
            "--quiet",
        ]
    )
    assert rc == 2
    assert "pip install 'blackbox-sat[ray]'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backend"):
        compare("mzi", out=tmp_path / "z", backend="dask", **TINY)


# --------------------------------------------------------------------------------------
# served devices: one physical instrument, trials serialised on it
# --------------------------------------------------------------------------------------
class Slow:
    """A device whose every query takes ``delay`` seconds, like reprogramming hardware."""

    def __init__(self, device, delay):
        self.device, self.delay = device, delay
        for name in ("n_params", "in_dim", "out_dim", "bounds", "periodic", "input_bounds"):
            setattr(self, name, getattr(device, name))

    def query(self, theta, x):
        time.sleep(self.delay)
        return self.device.query(theta, x)


@pytest.fixture
def served_mzi():
    from blackbox_sat.devices.server import DeviceServer
    from blackbox_sat.sim import BUILTINS

    server = DeviceServer(Slow(BUILTINS["mzi"](n_modes=4), 0.004), token=TOKEN).start()
    yield server.url
    server.close()


def query_windows(out: Path) -> list[tuple[float, float]]:
    spans = []
    for path in sorted(out.glob("runs/*/*/ledger.sqlite")):
        con = sqlite3.connect(path)
        lo, hi, n = con.execute("SELECT min(time), max(time), count(*) FROM queries").fetchone()
        con.close()
        if n:
            spans.append((lo, hi))
    return sorted(spans)


def test_trials_on_a_served_device_are_serialised_on_it(local_ray, served_mzi, tmp_path):
    res = compare(
        served_mzi,
        task="iris",
        methods=["spsa"],
        seeds=3,
        budget=30,
        out=tmp_path / "tcp",
        device_kw={"token": TOKEN},
        progress=False,
        backend="ray",
    )
    assert [r["status"] for r in res["rows"]] == ["ok"] * 3, res["rows"]
    spans = query_windows(tmp_path / "tcp")
    assert len(spans) == 3
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), (
        spans
    )  # no two trials on the device at once
    for path in (tmp_path / "tcp").rglob("*"):  # the token opened the device, and is nowhere
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_the_gate_is_taken_at_the_first_query_and_held_to_the_end(served_mzi):
    """A model-based trial trains without the device and queues only for its evaluation."""
    from blackbox_sat.devices.remote import RemoteDevice

    events = []

    class Gate:
        def acquire(self, owner):
            events.append(("acquire", owner))

        def release(self, owner):
            events.append(("release", owner))

    original = RemoteDevice.query
    dev = RemoteDevice(served_mzi, token=TOKEN)
    with backends._gated_device_queries(Gate(), "me"):
        assert events == []  # connecting is not a query
        theta = dev.theta0 if dev.theta0 is not None else (dev.bounds[0] + dev.bounds[1]) / 2
        x = [[0.0] * dev.in_dim]
        dev.query(theta, x)
        dev.query(theta, x)
        assert events == [("acquire", "me")]
    assert events == [("acquire", "me"), ("release", "me")]
    assert RemoteDevice.query is original
    with backends._gated_device_queries(Gate(), "idle"):
        pass
    assert events[-1] == ("release", "me")  # never queried: never took the device
    dev.close()


def test_dispatch_keeps_one_device_query_trial_per_served_device_in_flight():
    trial = lambda m, s, dev: Trial(m, s, dev, {}, "iris", 10, {}, (), {}, "out")  # noqa: E731
    todo = [
        trial("offline", 0, "tcp://h:1"),
        trial("spsa", 0, "tcp://h:1"),
        trial("spsa", 1, "tcp://h:1"),
        trial("spsa", 0, "tcp://h:2"),
        trial("spsa", 0, "mzi"),
        trial("oracle", 1, "tcp://h:1"),
    ]
    now, later = backends._dispatch_order(todo)
    assert [(t.method, t.seed, t.device) for t in now] == [
        ("spsa", 0, "tcp://h:1"),
        ("spsa", 0, "tcp://h:2"),  # the device-query ones first, one per device
        ("offline", 0, "tcp://h:1"),
        ("spsa", 0, "mzi"),
        ("oracle", 1, "tcp://h:1"),
    ]
    assert [(t.method, t.seed) for t in later] == [("spsa", 1)]
    assert backends._next_for("tcp://h:2", later) is None
    assert backends._next_for("tcp://h:1", later).seed == 1 and not later


def test_file_gate_excludes_a_second_holder(tmp_path):
    import fcntl
    import os

    spec = f"tcp://gate-test-{tmp_path.name}:1"  # a lock file of its own
    gate = backends.FileGate(spec)
    gate.acquire("a")
    fd = os.open(gate.path, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got = threading.Event()
    other = backends.FileGate(spec)
    t = threading.Thread(target=lambda: (other.acquire("b"), got.set(), other.release("b")))
    t.start()
    assert not got.wait(0.3)  # blocked while "a" holds it
    gate.release("a")
    assert got.wait(5)
    t.join()
    os.close(fd)
    os.unlink(gate.path)
