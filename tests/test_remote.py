"""The TCP device server and client: round trip, security, journal, faults.

Servers run in-process (threads, port 0) or as ``python -m blackbox_sat.cli serve-device``
subprocesses on 127.0.0.1; every one is stopped by its test. Shared helpers live in
``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blackbox_sat as bs
import blackbox_sat.devices.remote as remote_mod
from blackbox_sat.cli import main
from blackbox_sat.devices.contract import DeviceContractError, DeviceOutputError, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import MeteredDevice
from blackbox_sat.devices.remote import (
    DeviceConnectionError,
    DeviceTimeoutError,
    RemoteAuthError,
    RemoteDevice,
    RemoteDeviceError,
)
from blackbox_sat.devices.server import DeviceServer
from blackbox_sat.devices.wire import encode_array, loads, pack
from blackbox_sat.sim import BUILTINS

from .conftest import QUIET, TOKEN, Faulty, mrr4, start_server_process, stop, wait_for


def raw_exchange(url_or_addr, payload: bytes, read_reply: bool = True, timeout: float = 5.0):
    """Send raw bytes on a fresh connection and return the decoded reply (None on EOF)."""
    host, port = _addr(url_or_addr)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        if not read_reply:
            return None
        head = _recv(s, 4)
        if head is None:
            return None
        (n,) = struct.unpack(">I", head)
        body = _recv(s, n)
        return None if body is None else loads(body)


def _recv(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _addr(url_or_addr):
    if isinstance(url_or_addr, tuple):
        return url_or_addr
    m = re.match(r"tcp://([^:]+):(\d+)", url_or_addr)
    return m.group(1), int(m.group(2))


def request(url, token=TOKEN, **fields):
    return raw_exchange(url, pack({"v": 1, "token": token, **fields}))


def healthy(url) -> bool:
    """A fresh valid client gets its info."""
    reply = request(url, kind="info")
    return reply is not None and reply["status"] == "ok" and reply["info"]["n_params"] > 0


@pytest.fixture
def served(tmp_path):
    """An in-process server of a quiet mrr4 wrapped in :class:`Faulty` (healthy)."""
    dev = Faulty(mrr4(noise=0.0, programming_noise=0.0))
    srv = DeviceServer(dev, TOKEN, journal=tmp_path / "journal.sqlite").start()
    yield srv, dev
    dev.release.set()
    srv.close()


# --------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,kw", [("mrr", QUIET), ("mzi", {"n_modes": 4, "noise": 0.0, "programming_noise": 0.0})]
)
def test_info_and_query_round_trip_equal_in_process(spec, kw):
    local, served_dev = BUILTINS[spec](**kw), BUILTINS[spec](**kw)
    with DeviceServer(served_dev, TOKEN) as srv:
        remote = RemoteDevice(srv.url, token=TOKEN)
        a, b = describe(local), describe(remote)
        for field in ("n_params", "in_dim", "out_dim", "max_batch", "has_bounds"):
            assert getattr(a, field) == getattr(b, field)
        for field in ("low", "high", "periodic", "input_low", "input_high", "theta0"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
        rng = np.random.default_rng(1)
        for i in range(3):
            theta = a.project(a.start(i) + rng.normal(0, 0.05, a.n_params) * a.scale)
            x = rng.uniform(a.input_low, a.input_high, (7, a.in_dim))
            assert np.array_equal(local.query(theta, x), remote.query(theta, x))
        remote.close()


def test_token_from_environment_and_missing_token(served, monkeypatch):
    srv, _ = served
    monkeypatch.delenv("BLACKBOX_SAT_TOKEN", raising=False)
    with pytest.raises(RemoteAuthError, match="BLACKBOX_SAT_TOKEN"):
        RemoteDevice(srv.url)
    with pytest.raises(RemoteAuthError, match="refused the token"):
        RemoteDevice(srv.url, token="wrong")
    monkeypatch.setenv("BLACKBOX_SAT_TOKEN", TOKEN)
    dev = bs.load_device(srv.url, timeout=5.0)  # the tcp:// spec path, keywords to the client
    assert isinstance(dev, RemoteDevice) and dev.n_params == 12 and TOKEN not in repr(dev)


def test_validation_errors_name_the_member_and_are_not_retried(served):
    srv, dev = served
    remote = RemoteDevice(srv.url, token=TOKEN)
    info = describe(remote)
    with pytest.raises(DeviceContractError, match=r"theta must have shape \(n_params,\) = \(12,\)"):
        remote.query(np.zeros(5), np.zeros((2, 4)))  # caught by the client before sending
    # the server validates too (a client in another language may not): bypass the client's check
    for theta, x, msg in [
        (np.zeros(5), np.zeros((2, 4)), r"theta must have shape"),
        (info.start(0), np.full((2, 4), 7.0), "outside input_bounds"),
        (np.full(12, 1e3), np.zeros((2, 4)), r"theta\[0\].*outside bounds"),
        (info.start(0), np.zeros((2, 5)), r"x must have shape \(batch, in_dim\)"),
    ]:
        with pytest.raises(DeviceContractError, match=msg):
            remote._call(
                {
                    "kind": "query",
                    "id": f"v{len(msg)}",
                    "theta": encode_array(theta),
                    "x": encode_array(x),
                }
            )
    assert dev.calls == 0 and remote.reconnects == 0
    reply = request(srv.url, kind="query", id="lists", theta=[[1.0, True]], x="no")
    assert reply["status"] == "error" and reply["error"]["type"] == "contract"


# --------------------------------------------------------------------------------------
# security: the server stays up for the next valid client
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    proc, url = start_server_process(tmp, extra=("--max-message-bytes", "65536"))
    yield proc, url, tmp
    stop(proc)


def test_wrong_or_missing_token_refused(server_process):
    _proc, url, tmp = server_process
    for token in ("wrong-token", "", None, 12345, TOKEN[:-1], TOKEN + "x"):
        fields = {"kind": "info"} if token is None else {"kind": "info", "token": token}
        reply = raw_exchange(url, pack({"v": 1, **fields}))
        assert reply["status"] == "error" and reply["error"]["type"] == "auth", token
        assert "info" not in reply
        assert healthy(url)
    assert "status=error:auth" in (tmp / "server.log").read_text()


def test_garbage_oversized_and_truncated_messages(server_process):
    proc, url, _tmp = server_process
    # an HTTP request: its first 4 bytes read as a ~1.2 GB length -> refused before reading
    reply = raw_exchange(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply["error"]["type"] == "too_large" and "65536" in reply["error"]["message"]
    assert healthy(url)
    # a header announcing 100 MiB, no body sent: a server that waited for the body could
    # never answer, so any reply at all shows it answered from the header alone
    reply = raw_exchange(url, struct.pack(">I", 100 << 20), timeout=30)
    assert reply["error"]["type"] == "too_large" and "nothing was read" in reply["error"]["message"]
    # framed garbage, non-object JSON, NaN literals
    for body in (b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"token": NaN}', b"", b"{" * 5000):
        reply = raw_exchange(url, struct.pack(">I", len(body)) + body)
        if body:
            assert reply["status"] == "error" and reply["error"]["type"] in (
                "bad_request",
                "auth",
            ), body[:20]
        assert healthy(url)
    # truncated frame, then the peer disappears
    raw_exchange(url, struct.pack(">I", 1000) + b"x" * 10, read_reply=False)
    # a valid client whose query is over the cap gets a clear error
    remote = RemoteDevice(url, token=TOKEN)
    info = describe(remote)
    with pytest.raises(RemoteDeviceError, match="too_large"):
        remote.query(info.start(0), np.full((4000, 4), 0.5))
    assert remote.query(info.start(0), np.full((3, 4), 0.5)).shape == (3, 3)
    assert proc.poll() is None and healthy(url)


def test_stalled_connection_does_not_block_others(server_process):
    _proc, url, _ = server_process
    with socket.create_connection(_addr(url)) as stalled:
        stalled.sendall(struct.pack(">I", 500) + b'{"tok')  # a slow client, mid-frame
        assert healthy(url)
        remote = RemoteDevice(url, token=TOKEN)
        assert remote.query(describe(remote).start(0), np.full((2, 4), 0.5)).shape == (2, 3)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=30,
)
ARRAYISH = st.one_of(
    JSON,
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=14),
    st.lists(st.lists(st.floats(-2, 2), min_size=4, max_size=4), max_size=3),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["<f8", "float64", "int8", 3]),
            "shape": st.lists(st.integers(-1, 14), max_size=3),
            "b64": st.text(max_size=40),
        }
    ),
)
MESSAGES = st.fixed_dictionaries(
    {"kind": st.sampled_from(["info", "query", "stats", "nope"]) | JSON},
    optional={
        "token": st.sampled_from([TOKEN, "bad"]) | JSON,
        "v": st.sampled_from([1, 2]) | JSON,
        "id": st.sampled_from(["a:1", "a:2"]) | JSON,
        "theta": ARRAYISH,
        "x": ARRAYISH,
    },
)


@pytest.fixture(scope="module")
def fuzz_server():
    srv = DeviceServer(mrr4(), TOKEN).start()
    yield srv
    srv.close()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300))
def test_random_bytes_leave_server_up(fuzz_server, data):
    with contextlib.suppress(TimeoutError):
        raw_exchange(
            fuzz_server.url,
            data,
            read_reply=bool(data)
            and len(data) >= 4
            and struct.unpack(">I", data[:4])[0] <= len(data) - 4,
            timeout=2.0,
        )
    assert healthy(fuzz_server.url) and fuzz_server.stats["internal_errors"] == 0


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(msg=MESSAGES)
def test_random_messages_leave_server_up(fuzz_server, msg):
    reply = raw_exchange(fuzz_server.url, pack(msg))
    assert reply is not None and reply["status"] in ("ok", "error")
    if reply["status"] == "error":
        assert (
            reply["error"]["type"] in ("auth", "bad_request", "contract")
            and reply["error"]["message"]
        )
    assert healthy(fuzz_server.url) and fuzz_server.stats["internal_errors"] == 0


# --------------------------------------------------------------------------------------
# request ids and the journal
# --------------------------------------------------------------------------------------
def _query_fields(info, i=0, batch=3):
    rng = np.random.default_rng(i)
    return {
        "theta": encode_array(info.start(i)),
        "x": encode_array(rng.uniform(0, 1, (batch, info.in_dim))),
    }


def test_retried_id_answered_from_journal(served):
    srv, dev = served
    info = srv.info
    q = _query_fields(info)
    first = request(srv.url, kind="query", id="run:1", **q)
    again = request(srv.url, kind="query", id="run:1", **q)
    assert first["status"] == again["status"] == "ok" and not first["journal"] and again["journal"]
    assert first["y"] == again["y"] and dev.calls == 1
    other = request(srv.url, kind="query", id="run:1", **_query_fields(info, 1))
    assert other["error"]["type"] == "bad_request" and "already used" in other["error"]["message"]
    assert request(srv.url, kind="query", id="run:2", **q)["journal"] is False and dev.calls == 2


def test_concurrent_clients_are_served_one_device_call_at_a_time(served):
    srv, dev = served
    dev.delay = 0.003
    errors = []

    def client(k):
        try:
            remote = RemoteDevice(srv.url, token=TOKEN)
            for i in range(8):
                assert remote.query(
                    remote._info.start(k), np.full((2, 4), 0.1 * (i + 1))
                ).shape == (2, 3)
            remote.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and dev.calls == 32 and dev.max_active == 1


def test_retry_while_first_attempt_in_flight_waits_for_it(served):
    srv, dev = served
    dev.mode, dev.after = "gate", 0
    q = _query_fields(srv.info)
    replies, second_waits = [], threading.Event()

    class Watched(dict):  # signals when a request finds its id already in flight
        def get(self, key, default=None):
            found = super().get(key, default)
            if found is not None:
                second_waits.set()
            return found

    srv._inflight = Watched()
    t = threading.Thread(
        target=lambda: replies.append(request(srv.url, kind="query", id="g:1", **q))
    )
    t.start()
    assert dev.reached.wait(10)
    t2 = threading.Thread(
        target=lambda: replies.append(request(srv.url, kind="query", id="g:1", **q))
    )
    t2.start()
    assert second_waits.wait(30)  # the retry is waiting on the first attempt's call
    assert healthy(srv.url)  # info does not wait for the busy device
    dev.release.set()
    t.join(10), t2.join(10)
    assert len(replies) == 2 and replies[0]["y"] == replies[1]["y"] and dev.calls == 1
    assert sorted(r["journal"] for r in replies) == [False, True]


def test_journal_survives_server_kill_and_restart(tmp_path):
    journal = tmp_path / "j.sqlite"
    proc, url = start_server_process(tmp_path, journal=journal)
    try:
        info = RemoteDevice(url, token=TOKEN)._info
        q = _query_fields(info, 3)
        first = request(url, kind="query", id="run:7:abc", **q)
        assert first["status"] == "ok" and not first["journal"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        stop(proc)
    proc, url = start_server_process(tmp_path, journal=journal, name="server2")
    try:
        again = request(url, kind="query", id="run:7:abc", **q)
        assert again["journal"] is True and again["y"] == first["y"]
        stats = request(url, kind="stats")["stats"]
        assert (
            stats["device_calls"] == 0 and stats["journal_hits"] == 1 and stats["journal_rows"] == 1
        )
    finally:
        stop(proc)


def test_client_reconnects_across_restart_and_reports_a_dead_server(tmp_path, monkeypatch):
    journal = tmp_path / "j.sqlite"
    dev = mrr4(**QUIET)
    srv = DeviceServer(dev, TOKEN, journal=journal).start()
    host, port = srv.address
    remote = RemoteDevice(srv.url, token=TOKEN, retries=8, backoff=0.05, max_backoff=0.2)
    theta, x = remote._info.start(0), np.full((2, 4), 0.5)
    y0 = remote.query(theta, x)
    srv.close()
    box, backoffs = {}, []

    def backoff(seconds):  # the client's wait between attempts: the server comes back during
        backoffs.append(seconds)  # the first one, so at least one attempt met a dead port
        if "srv" not in box:
            box["srv"] = DeviceServer(
                mrr4(**QUIET), TOKEN, host=host, port=port, journal=journal
            ).start()

    monkeypatch.setattr(
        remote_mod, "time", SimpleNamespace(sleep=backoff, monotonic=time.monotonic)
    )
    try:
        assert np.array_equal(remote.query(theta, x), y0) and remote.reconnects >= 1
        assert backoffs == [0.05]
    finally:
        if "srv" in box:
            box["srv"].close()
    remote.retries, backoffs[:] = 2, []
    with pytest.raises(
        DeviceConnectionError, match=r"(?s)cannot reach the device server.*serve-device.*--resume"
    ):
        remote.query(theta, x)
    assert backoffs == [0.05, 0.1]  # 3 attempts, exponential backoff between them
    assert isinstance(DeviceConnectionError("x"), ConnectionError)


# --------------------------------------------------------------------------------------
# faults through the metered device and through training
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,msg",
    [
        ("raise", "device.query raised OSError: instrument timeout on channel 3"),
        ("nan", "non-finite"),
        ("shape", r"returned shape \(5, 2\)"),
        ("hang", r"no reply to query .* within 0.5 s"),
    ],
)
def test_faulty_served_device_gives_clear_error_and_bad_ledger_row(served, tmp_path, mode, msg):
    srv, dev = served
    dev.mode, dev.after = mode, 1
    remote = RemoteDevice(srv.url, token=TOKEN, timeout=0.5)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        meter = MeteredDevice(remote, ledger)
        remote.bind_ledger(ledger)
        theta, x = meter.info.start(0), np.full((5, 4), 0.5)
        meter.query(theta, x, purpose="probe")
        with pytest.raises(DeviceOutputError, match=msg) as err:
            meter.query(theta, x, purpose="probe")
        assert isinstance(err.value, DeviceTimeoutError) == (mode == "hang")
        rows = list(ledger.rows())
        assert (
            [r.ok for r in rows] == [True, False]
            and re.search(msg, rows[1].error)
            and rows[1].y is None
        )
        assert ledger.counts()["settings"] == 2
    dev.release.set()
    assert healthy(srv.url)


def test_training_on_faulty_device_fails_clearly_and_resumes(served, tmp_path, monkeypatch):
    srv, dev = served
    monkeypatch.setenv("BLACKBOX_SAT_TOKEN", TOKEN)
    dev.mode, dev.after = "nan", 6
    out = tmp_path / "run"
    with pytest.raises(DeviceOutputError, match="non-finite"):
        bs.train(
            srv.url,
            task="iris",
            method="spsa",
            budget=40,
            out=out,
            progress=False,
            device_kw={"timeout": 5.0},
        )
    with Ledger(out / "ledger.sqlite") as ledger:
        rows = list(ledger.rows())
    assert (
        len(rows) == 7
        and all(r.ok for r in rows[:6])
        and not rows[6].ok
        and "non-finite" in rows[6].error
    )
    dev.mode = None  # the instrument is fixed
    result = bs.resume(out, progress=False)
    assert (
        result["replayed_settings"] == 6
        and result["bad_queries"] == 1
        and result["settings_used"] <= 40
    )
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.counts()["rows"] == result["settings_used"] + result["eval_settings"]


def test_token_is_never_written_to_the_run(served, tmp_path, monkeypatch):
    srv, _ = served
    monkeypatch.delenv("BLACKBOX_SAT_TOKEN", raising=False)
    out = tmp_path / "run"
    result = bs.train(
        srv.url,
        task="iris",
        method="spsa",
        budget=12,
        out=out,
        progress=False,
        device_kw={"token": TOKEN, "timeout": 5.0},
    )
    assert result["settings_used"] <= 12
    for path in out.iterdir():
        assert TOKEN.encode() not in path.read_bytes(), path.name
    assert json.loads((out / "config.json").read_text())["device_kw"] == {"timeout": 5.0}


def test_a_device_kw_token_appears_in_no_output(served, tmp_path, monkeypatch, capsys, caplog):
    """Given only by ``--device-kw token=...``: it opens the device for train, evaluate and
    collect, and shows up in no file, no printed line, no returned dict and no log record."""
    srv, _ = served
    monkeypatch.delenv("BLACKBOX_SAT_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    kw = ["--device-kw", f"token={TOKEN}", "--device-kw", "timeout=5.0"]
    run, col = tmp_path / "run", tmp_path / "col"
    train = ["train", "--device", srv.url, *kw, "--task", "iris", "--method", "spsa"]
    assert main([*train, "--budget", "12", "--out", str(run), "--quiet"]) == 0
    ev = ["evaluate", "--run", str(run), "--device", srv.url, *kw]
    assert main([*ev, "--json", str(tmp_path / "e.json")]) == 0
    collect = ["collect", "--device", srv.url, *kw, "--settings", "3", "--random"]
    assert main([*collect, "--inputs", "4", "--task", "iris", "--out", str(col)]) == 0
    returned = bs.evaluate(run, srv.url, {"token": TOKEN})
    assert returned["device_kw"] == {}
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and TOKEN not in caplog.text
    assert TOKEN not in json.dumps(returned)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"config.json", "result.json", "e.json", "ledger.sqlite"} <= {p.name for p in written}
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_collect_binds_request_ids_so_a_rerun_pays_nothing_twice(served, tmp_path):
    """A collect killed after the device measured a setting but before the ledger kept it,
    then re-run: the settings in the ledger are replayed and the one in flight comes from the
    server's journal; the device measures each setting once."""
    from blackbox_sat.harness.collect import collect

    srv, dev = served
    remote, out = RemoteDevice(srv.url, token=TOKEN), tmp_path / "col"
    first = collect(remote, 6, out, inputs=8, task="iris")
    with Ledger(out / "ledger.sqlite") as ledger:
        namespace = ledger.get_meta("request_namespace")
    assert namespace and remote.last_request_id.startswith(f"{namespace}:6:")
    calls = dev.calls
    with contextlib.closing(sqlite3.connect(out / "ledger.sqlite")) as db, db:
        db.execute("DELETE FROM queries WHERE id = (SELECT max(id) FROM queries)")  # the kill
    again = collect(RemoteDevice(srv.url, token=TOKEN), 6, out, inputs=8, task="iris")
    assert dev.calls == calls and srv.stats["journal_hits"] == 1
    assert again["settings"] == first["settings"] == 6
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.counts()["settings"] == 6


def test_device_object_reusable_after_a_run(served, tmp_path):
    srv, dev = served
    remote = RemoteDevice(srv.url, token=TOKEN, timeout=5.0)
    result = bs.train(
        remote, task="iris", method="spsa", budget=12, out=tmp_path / "run", progress=False
    )
    assert result["settings_used"] <= 12
    calls = dev.calls
    # The served chip is noise-free: through the reused client it scores exactly what the
    # same chip scores in process. The run's ledger is closed: ids fall back to the client's.
    remote_acc = bs.evaluate(result, remote)["accuracy"]
    assert dev.calls > calls and remote.last_request_id.count(":") == 1
    assert remote_acc == bs.evaluate(result, dev.device)["accuracy"]


def test_cli_serve_device_requires_a_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("BLACKBOX_SAT_TOKEN", raising=False)
    assert (
        main(["serve-device", "--device", "mrr", "--port", "0", "--journal", str(tmp_path / "j")])
        == 2
    )
    assert "needs a token" in capsys.readouterr().err


def test_cli_serve_device_runs_one_torch_thread_unless_told(monkeypatch, tmp_path, capsys):
    import blackbox_sat.devices.server as server_mod

    monkeypatch.setenv("BLACKBOX_SAT_TOKEN", TOKEN)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's SIGTERM handler
    monkeypatch.setattr(server_mod.log, "handlers", [logging.NullHandler()])
    seen = []
    monkeypatch.setattr(
        DeviceServer, "serve_forever", lambda self: seen.append(torch.get_num_threads())
    )
    args = ["serve-device", "--device", "mrr", "--port", "0", "--journal", str(tmp_path / "j")]
    try:
        for extra in ([], ["--threads", "2"], ["--threads", "0"]):
            torch.set_num_threads(3)  # what torch would pick on a 3-core machine
            assert main(args + extra) == 0
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 2, 3]  # 0 keeps torch's own choice
    assert "serve-device stopped" in capsys.readouterr().out


def test_idle_and_unauthenticated_connections_are_closed(monkeypatch):
    import blackbox_sat.devices.server as server_mod

    monkeypatch.setattr(server_mod, "AUTH_TIMEOUT", 0.3)
    with DeviceServer(mrr4(**QUIET), TOKEN, idle_timeout=0.6) as srv:
        # closed by the server, nothing sent (a server that kept it open would time this out)
        with socket.create_connection(srv.address, timeout=30) as silent:
            assert silent.recv(1) == b""
        wait_for(lambda: srv.connections == 0)
        remote = RemoteDevice(srv.url, token=TOKEN, backoff=1.0)
        theta, x = remote._info.start(0), np.full((2, 4), 0.5)
        remote.query(theta, x)
        wait_for(lambda: srv.connections == 0)  # idle: the server drops the kept-alive connection
        backoffs = []
        monkeypatch.setattr(
            remote_mod, "time", SimpleNamespace(sleep=backoffs.append, monotonic=time.monotonic)
        )
        remote.query(theta, x)
        assert remote.reconnects == 1 and backoffs == []  # reconnected at once, no backoff
