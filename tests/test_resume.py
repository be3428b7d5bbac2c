"""Kill and resume against a served device: no query lost, none paid twice.

The trainer runs as ``python -m blackbox_sat.cli train`` subprocesses against an in-process
server whose device can hold one call (``Faulty`` in gate mode), so the kill lands exactly
while a query is being measured: the hardest case, where the device has paid for a result
the trainer never received. Each run is compared, row by row, with an uninterrupted reference
run on a fresh, identical chip: with read noise on, identical outputs mean the device was
called in exactly the same sequence, so nothing was re-measured or lost.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat.cli import main
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.server import DeviceServer
from blackbox_sat.devices.wire import query_digest

from .conftest import QUIET, ROOT, TOKEN, Faulty, mrr4, start_server_process, stop, wait_for

BUDGET = 150
TRAIN = ["--task", "iris", "--method", "spsa", "--budget", str(BUDGET), "--seed", "0", "--quiet"]


def trainer(args, **popen):
    env = {**os.environ, "BLACKBOX_SAT_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "blackbox_sat.cli", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def ledger_rows(path):
    with Ledger(path) as ledger:
        return list(ledger.rows())


def reference_run(tmp_path, device_kw=None):
    """The same training, uninterrupted, on a fresh identical chip; returns (rows, device calls)."""
    dev = Faulty(mrr4(**(device_kw or {})))
    with DeviceServer(dev, TOKEN) as srv:
        bs.train(
            srv.url,
            task="iris",
            method="spsa",
            budget=BUDGET,
            seed=0,
            out=tmp_path / "ref",
            progress=False,
            device_kw={"token": TOKEN},
        )
    return ledger_rows(tmp_path / "ref" / "ledger.sqlite"), dev.calls


def assert_same_queries(rows, ref, compare_y=True):
    assert len(rows) == len(ref)
    for a, b in zip(rows, ref):
        assert (
            a.ok
            and a.purpose == b.purpose
            and np.array_equal(a.theta, b.theta)
            and np.array_equal(a.x, b.x)
        )
        if compare_y:
            assert np.array_equal(a.y, b.y)


def journal_digests(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT digest FROM journal")]


def lost_queries(journal, rows) -> int:
    """Results the device measured (journal) that are missing from the ledger."""
    ledger = [query_digest(r.theta, r.x) for r in rows if r.ok]
    missing = 0
    for d in journal:
        if d in ledger:
            ledger.remove(d)
        else:
            missing += 1
    return missing


def test_sigkill_trainer_mid_query_then_resume(tmp_path, monkeypatch, capsys):
    """SIGKILL the trainer while the device measures query 61; resume; the final ledger equals
    an uninterrupted run's, query 61 comes from the journal, and nothing is measured twice."""
    journal = tmp_path / "journal.sqlite"
    dev = Faulty(mrr4(), mode="gate", after=60)
    out = tmp_path / "run"
    with DeviceServer(dev, TOKEN, journal=journal) as srv:
        proc = trainer(
            ["--device", srv.url, "--device-kw", "timeout=60", "--out", str(out), *TRAIN]
        )
        try:
            assert dev.reached.wait(90), finish(proc, 1)
            os.kill(proc.pid, signal.SIGKILL)
            assert finish(proc)[0] == -signal.SIGKILL
        finally:
            dev.release.set()
        wait_for(lambda: len(srv.journal) == 61)
        rows_at_kill = len(ledger_rows(out / "ledger.sqlite"))
        assert rows_at_kill == 60 and not (out / "result.json").exists()
        calls_before = dev.calls
        monkeypatch.setenv(
            "BLACKBOX_SAT_TOKEN", TOKEN
        )  # the token is read from the environment on resume
        assert main(["train", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
        stats = dict(srv.stats)
    result = bs.resume(out)  # finished: just reads result.json
    rows = ledger_rows(out / "ledger.sqlite")
    ref, ref_calls = reference_run(tmp_path)
    assert_same_queries(rows, ref)  # every query exactly once, in order, same outputs
    assert dev.calls == ref_calls  # no setting measured twice
    re_measured = dev.calls - ref_calls
    lost = lost_queries(journal_digests(journal), rows)
    assert lost == 0 and re_measured == 0 and stats["journal_hits"] == 1
    assert result["replayed_settings"] == 60 and result["settings_used"] <= BUDGET
    assert len(rows) == result["settings_used"] + result["eval_settings"]
    print(
        f"\nkill/resume: rows at kill {rows_at_kill}, device calls before resume {calls_before}, queries lost {lost}, "
        f"settings re-measured after resume {re_measured}, in-flight query from journal {stats['journal_hits']}"
    )


def test_server_restart_mid_run_is_ridden_out(tmp_path):
    """The server stops while a query is measured and comes back on the same port and journal;
    the client reconnects with backoff and the run finishes as if nothing happened."""
    journal = tmp_path / "journal.sqlite"
    dev_a = Faulty(mrr4(**QUIET), mode="gate", after=40)
    srv_a = DeviceServer(dev_a, TOKEN, journal=journal).start()
    host, port = srv_a.address
    out = tmp_path / "run"
    proc = trainer(
        [
            "--device",
            srv_a.url,
            "--device-kw",
            "retries=30",
            "--device-kw",
            "backoff=0.05",
            "--device-kw",
            "max_backoff=0.2",
            "--out",
            str(out),
            *TRAIN,
        ]
    )
    srv_b = None
    try:
        assert dev_a.reached.wait(90), finish(proc, 1)
        srv_a.close()  # connections dropped: the trainer sees EOF and starts retrying
        dev_a.release.set()  # the call in flight completes and is journaled
        wait_for(lambda: len(srv_a.journal) == 41)
        dev_b = Faulty(mrr4(**QUIET))
        srv_b = DeviceServer(dev_b, TOKEN, host=host, port=port, journal=journal).start()
        rc, _stdout, stderr = finish(proc)
        assert rc == 0, stderr
    finally:
        dev_a.release.set()
        stop(proc)
        if srv_b is not None:
            srv_b.close()
    rows = ledger_rows(out / "ledger.sqlite")
    ref, ref_calls = reference_run(tmp_path, QUIET)
    assert_same_queries(rows, ref)
    assert dev_a.calls + dev_b.calls == ref_calls and srv_b.stats["journal_hits"] == 1
    assert lost_queries(journal_digests(journal), rows) == 0


def test_server_down_for_good_fails_clearly_then_resumes_on_its_new_port(
    tmp_path, monkeypatch, capsys
):
    """The server stays down past the retries: the trainer stops with a message that says what
    to do, the ledger stays readable, and `train --resume DIR --device tcp://host:NEWPORT`
    finishes once the server is back on another port, with the same journal."""
    journal = tmp_path / "journal.sqlite"
    dev_a = Faulty(mrr4(), mode="gate", after=30)
    srv_a = DeviceServer(dev_a, TOKEN, journal=journal).start()
    host, port = srv_a.address
    out = tmp_path / "run"
    proc = trainer(
        [
            "--device",
            srv_a.url,
            "--device-kw",
            "retries=2",
            "--device-kw",
            "backoff=0.05",
            "--out",
            str(out),
            *TRAIN,
        ]
    )
    try:
        assert dev_a.reached.wait(90), finish(proc, 1)
        srv_a.close()
        dev_a.release.set()
        rc, _stdout, stderr = finish(proc)
    finally:
        dev_a.release.set()
        stop(proc)
    assert (
        rc == 2 and "cannot reach the device server" in stderr and f"train --resume {out}" in stderr
    ), stderr
    rows = ledger_rows(out / "ledger.sqlite")
    assert len(rows) == 31 and all(r.ok for r in rows[:30]) and not rows[30].ok
    assert "DeviceConnectionError" in rows[30].error
    wait_for(lambda: len(srv_a.journal) == 31)  # the call in flight still completed on the device
    dev_b = Faulty(mrr4())
    with DeviceServer(dev_b, TOKEN, host=host, port=0, journal=journal) as srv_b:
        assert srv_b.address[1] != port
        monkeypatch.setenv("BLACKBOX_SAT_TOKEN", TOKEN)
        resumed = ["train", "--resume", str(out), "--device", srv_b.url, "--quiet"]
        assert main(resumed) == 0, capsys.readouterr().err
        hits = srv_b.stats["journal_hits"]
    rows = ledger_rows(out / "ledger.sqlite")
    result = bs.resume(out)
    good = [r for r in rows if r.ok]
    assert hits == 1  # the paid-for query in flight at the outage came from the journal
    assert dev_a.calls + dev_b.calls == len(good)  # each good row measured exactly once
    assert lost_queries(journal_digests(journal), rows) == 0
    assert result["bad_queries"] == 1 and result["settings_used"] <= BUDGET
    assert len(rows) == result["settings_used"] + result["eval_settings"]
    # the run now names the device where it is, so evaluate and a later resume find it there
    assert result["device"] == srv_b.url
    assert json.loads((out / "config.json").read_text())["device"] == srv_b.url


@pytest.mark.slow
def test_sigkill_server_process_mid_run(tmp_path):
    """A real `serve-device` process is SIGKILLed mid-run and restarted on the same port and
    journal; the trainer rides it out. At most the one query in flight is measured again."""
    journal = tmp_path / "journal.sqlite"
    device = ("tests.conftest:slow_mrr4", "noise=0.0", "programming_noise=0.0")
    server, url = start_server_process(tmp_path, device=device, journal=journal)
    port = url.rsplit(":", 1)[1]
    out = tmp_path / "run"
    proc = trainer(
        [
            "--device",
            url,
            "--device-kw",
            "retries=40",
            "--device-kw",
            "backoff=0.1",
            "--device-kw",
            "max_backoff=0.5",
            "--out",
            str(out),
            *TRAIN,
        ]
    )
    try:
        wait_for(
            lambda: (
                (out / "ledger.sqlite").exists() and len(ledger_rows(out / "ledger.sqlite")) >= 50
            ),
            90,
        )
        os.kill(server.pid, signal.SIGKILL)
        stop(server)
        server, _ = start_server_process(
            tmp_path, device=device, journal=journal, port=int(port), name="server2"
        )
        rc, _, stderr = finish(proc)
        assert rc == 0, stderr
    finally:
        stop(proc)
        stop(server)
    rows = ledger_rows(out / "ledger.sqlite")
    ref, _ = reference_run(tmp_path, QUIET)
    assert_same_queries(rows, ref)
    journal_rows = len(journal_digests(journal))
    assert journal_rows == len(rows)  # every result the device gave is in the ledger exactly once
