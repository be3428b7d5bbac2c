"""``blackbox-sat serve-device``: serve one device over TCP to :class:`~.remote.RemoteDevice`.

Standard library only (``socketserver`` threads, ``sqlite3``); the wire protocol is in
:mod:`.wire` and in docs/design.md, "Wire protocol (version 1)".

- Binds ``127.0.0.1`` unless another host is given. Traffic is not encrypted: across an
  untrusted network, tunnel it (``ssh -L``).
- Every request carries the shared token, compared in constant time
  (:func:`hmac.compare_digest`). A missing or wrong token gets an ``auth`` error and the
  connection is closed.
- A frame header over ``max_message_bytes`` is refused before its body is read. Garbage
  (unparseable JSON, a non-object) gets a ``bad_request`` error and the connection closed.
- ``theta`` and ``x`` are validated with :mod:`.contract` (shape, dtype, finite, bounds,
  ``max_batch``) before the device is touched.
- One device, one call at a time: device access is serialised by a lock while any number
  of connections (up to ``max_connections``) are served, each in its own thread. ``info``
  and ``stats`` never wait for the device.
- Every request is logged on logger ``blackbox_sat.server``, one line each: time, peer,
  request id, kind, status, duration.

**Journal.** Every successful query's result is written, before the reply is sent, to a
SQLite file in WAL mode (``journal``: table ``journal(request_id TEXT PRIMARY KEY, time,
digest, batch, out_dim, y BLOB)``, ``y`` little-endian float64). A query whose id is in the
journal is answered from it (reply ``"journal": true``) without touching the device, also
after a server restart on the same file; a retry that arrives while its first attempt is
still being measured waits for that attempt. An id reused with a different ``theta``/``x``
is refused. Failed calls (device raised, NaN, wrong shape) are not journaled: a retry of one
measures again. The journal grows by one row per measured query (``y`` bytes plus ~150 B).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import socketserver
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from .contract import (
    DeviceContractError,
    DeviceOutputError,
    InvalidInput,
    check_inputs,
    check_outputs,
    check_theta,
    describe,
)
from .wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REQUEST_ID_RE,
    decode_array,
    encode_array,
    loads,
    pack,
    query_digest,
    read_header,
    recv_exact,
)

log = logging.getLogger("blackbox_sat.server")

#: Seconds a connection may sit idle (or stall mid-frame) before the server closes it.
DEFAULT_IDLE_TIMEOUT = 600.0
#: Connections served at once; more are answered ``busy`` and closed.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds a new connection has to send its first authenticated request (so that idle
#: unauthenticated connections cannot hold the slots).
AUTH_TIMEOUT = 10.0
KINDS = ("info", "query", "stats")

_JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    digest TEXT NOT NULL,
    batch INTEGER NOT NULL,
    out_dim INTEGER NOT NULL,
    y BLOB NOT NULL
);
"""


class _Refused(Exception):
    """A request answered with an error reply; ``close`` also ends the connection."""

    def __init__(self, etype: str, message: str, close: bool = False):
        super().__init__(message)
        self.etype, self.message, self.close = etype, message, close


class Journal:
    """Durable request id -> result map (SQLite, WAL). ``None`` path: in memory, not durable."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            ":memory:" if self.path is None else str(self.path),
            timeout=30.0,
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_JOURNAL_SCHEMA)

    def get(self, request_id: str):
        """``(digest, y)`` or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT digest, batch, out_dim, y FROM journal WHERE request_id=?", (request_id,)
            ).fetchone()
        if row is None:
            return None
        return row[0], np.frombuffer(row[3], "<f8").reshape(row[1], row[2]).copy()

    def put(self, request_id: str, digest: str, y: np.ndarray) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO journal VALUES (?,?,?,?,?,?)",
                (
                    request_id,
                    time.time(),
                    digest,
                    y.shape[0],
                    y.shape[1],
                    np.ascontiguousarray(y, "<f8").tobytes(),
                ),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM journal").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr, app: DeviceServer):
        self.app = app
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address):  # never print tracebacks for a client's doing
        self.app._bump("internal_errors")
        log.exception("peer=%s internal error", _peer(client_address))


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.app._serve_connection(self.request, self.client_address)


def _peer(addr) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return str(addr)


class DeviceServer:
    """Serves ``device`` (any contract object) on ``host:port`` (0: a free port).

    ``token``: the shared secret (required, non-empty). ``journal``: path of the durable
    journal (None: in memory, for tests and benchmarks only). Use :meth:`start` for a
    background thread or :meth:`serve_forever`; :meth:`close` stops listening and drops
    every connection.
    """

    def __init__(
        self,
        device,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        journal: str | Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        name: str | None = None,
    ):
        if not token:
            raise InvalidInput("serve-device needs a non-empty token")
        self.device = device
        self.info = describe(device)
        self.name = name or type(device).__name__
        self._token = str(token).encode("utf-8")
        self.max_message_bytes, self.idle_timeout = int(max_message_bytes), float(idle_timeout)
        self.journal = Journal(journal)
        self._device_lock = threading.Lock()
        self._state = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._slots = threading.BoundedSemaphore(int(max_connections))
        self._conns: set[socket.socket] = set()
        self._closing = False
        self._stats_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = {
            "requests": 0,
            "device_calls": 0,
            "journal_hits": 0,
            "errors": 0,
            "denied": 0,
            "internal_errors": 0,
        }
        self._tcp = _TCPServer((host, int(port)), self)
        self._info_reply = self._describe_info()

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        host, port = self._tcp.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"tcp://{host}:{port}"

    @property
    def connections(self) -> int:
        """Client connections open now (an idle one is closed after ``idle_timeout``)."""
        with self._state:
            return len(self._conns)

    def serve_forever(self) -> None:
        self._tcp.serve_forever(poll_interval=0.2)

    def start(self) -> DeviceServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"serve-device {self.url}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and drop every open connection (clients see EOF). A device call in
        flight finishes in its thread and still writes its result to the journal."""
        if self._closing:
            return
        self._closing = True
        if self._thread is not None:
            self._tcp.shutdown()
        self._tcp.server_close()
        with self._state:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- one connection --------------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket, addr) -> None:
        peer = _peer(addr)
        if not self._slots.acquire(blocking=False):
            self._send(
                sock,
                {
                    "v": PROTOCOL_VERSION,
                    "id": None,
                    "status": "error",
                    "error": {"type": "busy", "message": "too many connections; retry later"},
                },
            )
            log.info("peer=%s id=- kind=- status=busy 0.0ms", peer)
            return
        try:
            with self._state:
                self._conns.add(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(min(AUTH_TIMEOUT, self.idle_timeout))
            authed = False
            while not self._closing:
                try:
                    n = read_header(sock, eof_ok=True)
                except (OSError, ConnectionError):
                    break  # idle timeout, reset, or EOF inside a header
                if n is None:
                    break
                t0 = time.perf_counter()
                if n > self.max_message_bytes:
                    self._log_reply(
                        sock,
                        peer,
                        None,
                        "-",
                        t0,
                        _Refused(
                            "too_large",
                            f"message of {n} bytes exceeds the limit of {self.max_message_bytes} bytes "
                            "(serve-device --max-message-bytes); nothing was read",
                            close=True,
                        ),
                    )
                    break
                try:
                    body = recv_exact(sock, n)
                except (OSError, ConnectionError):
                    log.info(
                        "peer=%s id=- kind=- status=truncated %.1fms",
                        peer,
                        1e3 * (time.perf_counter() - t0),
                    )
                    break
                keep, ok_token = self._handle(sock, peer, body, t0)
                if ok_token and not authed:
                    authed = True
                    sock.settimeout(self.idle_timeout)
                if not keep:
                    break
        finally:
            with self._state:
                self._conns.discard(sock)
            self._slots.release()

    def _handle(self, sock, peer: str, body: bytes, t0: float) -> tuple[bool, bool]:
        """Answer one message; returns (keep the connection open, the token was valid)."""
        rid, kind, authed = None, "-", False
        try:
            try:
                msg = loads(body)
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                raise _Refused(
                    "bad_request", f"not a strict-JSON message: {str(exc)[:200]}", close=True
                ) from None
            if not isinstance(msg, dict):
                raise _Refused(
                    "bad_request",
                    f"a message must be a JSON object, got {type(msg).__name__}",
                    close=True,
                )
            token = msg.get("token")
            if not isinstance(token, str) or not token:
                raise _Refused("auth", "missing token", close=True)
            if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token):
                raise _Refused("auth", "wrong token", close=True)
            authed = True
            kind = str(msg["kind"]) if msg.get("kind") in KINDS else "invalid"
            raw_id = msg.get("id")
            if raw_id is not None:
                if not isinstance(raw_id, str) or not REQUEST_ID_RE.match(raw_id):
                    raise _Refused(
                        "bad_request", "id must be 1-128 characters of A-Z a-z 0-9 . _ : -"
                    )
                rid = raw_id
            if msg.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
                raise _Refused(
                    "bad_request",
                    f"protocol version {msg.get('v')!r} not supported (this server: "
                    f"{PROTOCOL_VERSION})",
                )
            if kind == "info":
                reply, status = dict(self._info_reply), "ok"
            elif kind == "stats":
                with self._stats_lock:
                    stats = dict(self.stats)
                reply, status = {"stats": {**stats, "journal_rows": len(self.journal)}}, "ok"
            elif kind == "query":
                if rid is None:
                    raise _Refused(
                        "bad_request", "a query needs an id (unique per query, reused on retry)"
                    )
                y, from_journal = self._query(rid, msg.get("theta"), msg.get("x"))
                reply, status = (
                    {"y": encode_array(y), "journal": from_journal},
                    ("journal" if from_journal else "ok"),
                )
            else:
                raise _Refused("bad_request", f"kind must be one of {list(KINDS)}")
        except _Refused as ref:
            return self._log_reply(sock, peer, rid, kind, t0, ref), authed
        except Exception as exc:
            self._bump("internal_errors")
            log.exception("peer=%s id=%s kind=%s internal error", peer, rid or "-", kind)
            return self._log_reply(
                sock, peer, rid, kind, t0, _Refused("internal", f"{type(exc).__name__}: {exc}")
            ), authed
        self._bump("requests")
        if status == "journal":
            self._bump("journal_hits")
        ok = self._send(sock, {"v": PROTOCOL_VERSION, "id": rid, "status": "ok", **reply})
        log.info(
            "peer=%s id=%s kind=%s status=%s %.1fms",
            peer,
            rid or "-",
            kind,
            status if ok else status + "+unsent",
            1e3 * (time.perf_counter() - t0),
        )
        return ok, authed

    def _bump(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _log_reply(self, sock, peer, rid, kind, t0, ref: _Refused) -> bool:
        self._bump("requests")
        self._bump("denied" if ref.etype == "auth" else "errors")
        ok = self._send(
            sock,
            {
                "v": PROTOCOL_VERSION,
                "id": rid,
                "status": "error",
                "error": {"type": ref.etype, "message": ref.message},
            },
        )
        log.info(
            "peer=%s id=%s kind=%s status=error:%s %.1fms (%s)",
            peer,
            rid or "-",
            kind,
            ref.etype,
            1e3 * (time.perf_counter() - t0),
            ref.message[:200],
        )
        return ok and not ref.close

    @staticmethod
    def _send(sock, obj) -> bool:
        try:
            sock.sendall(pack(obj))
            return True
        except OSError:
            return False

    # --- the device ------------------------------------------------------------------------
    def _describe_info(self) -> dict:
        i = self.info
        return {
            "info": {
                "n_params": i.n_params,
                "in_dim": i.in_dim,
                "out_dim": i.out_dim,
                "bounds": [encode_array(i.low), encode_array(i.high)] if i.has_bounds else None,
                "periodic": i.periodic.tolist(),
                "input_bounds": [encode_array(i.input_low), encode_array(i.input_high)],
                "max_batch": i.max_batch,
                "theta0": None if i.theta0 is None else encode_array(i.theta0),
            },
            "server": {
                "protocol": PROTOCOL_VERSION,
                "device": self.name,
                "max_message_bytes": self.max_message_bytes,
            },
        }

    def _validate(self, theta_obj, x_obj) -> tuple[np.ndarray, np.ndarray, str]:
        try:
            theta = decode_array(theta_obj, "theta")
            x = decode_array(x_obj, "x")
            digest = (
                query_digest(theta, x)
                if theta.dtype.kind in "fiu" and x.dtype.kind in "fiu"
                else ""
            )
            theta = check_theta(self.info, theta)
            x = check_inputs(self.info, x)
        except DeviceContractError as exc:
            raise _Refused("contract", str(exc)) from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise _Refused("contract", f"theta/x are not arrays of numbers: {exc}") from None
        if self.info.max_batch is not None and x.shape[0] > self.info.max_batch:
            raise _Refused(
                "contract",
                f"x has batch {x.shape[0]} > device.max_batch = {self.info.max_batch}; split it",
            )
        return theta, x, digest

    def _query(self, rid: str, theta_obj, x_obj) -> tuple[np.ndarray, bool]:
        theta, x, digest = self._validate(theta_obj, x_obj)
        while True:
            with self._state:
                hit = self.journal.get(rid)
                if hit is not None:
                    if hit[0] != digest:
                        raise _Refused(
                            "bad_request",
                            f"request id {rid} was already used for a different theta/x; a "
                            "retry must resend the identical query, a new query needs a new id",
                        )
                    return hit[1], True
                event = self._inflight.get(rid)
                if event is None:
                    event = self._inflight[rid] = threading.Event()
                    break
            event.wait()  # the same id is being measured for another connection: wait, then re-check
        try:
            with self._device_lock:
                self._bump("device_calls")
                try:
                    y = self.device.query(theta.copy(), x.copy())
                except Exception as exc:
                    raise _Refused(
                        "device", f"device.query raised {type(exc).__name__}: {exc}"
                    ) from None
            try:
                y = check_outputs(self.info, y, x.shape[0])
            except DeviceOutputError as exc:
                raise _Refused("device", str(exc)) from None
            self.journal.put(rid, digest, y)
            return y, False
        finally:
            with self._state:
                del self._inflight[rid]
            event.set()


def read_token(token_file: str | Path | None = None, env: str = "BLACKBOX_SAT_TOKEN") -> str:
    """The server token from ``token_file`` (stripped) or the environment variable."""
    import os

    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read --token-file {path}: {exc}") from exc
        if not token:
            raise InvalidInput(f"--token-file {path} is empty")
        try:
            if path.stat().st_mode & 0o077:
                log.warning("token file %s is readable by other users; chmod 600 it", path)
        except OSError:
            pass
        return token
    token = os.environ.get(env, "").strip()
    if not token:
        raise InvalidInput(
            f"serve-device needs a token: --token-file FILE or ${env}. Make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > token && chmod 600 token`"
        )
    return token


def default_journal(token_file: str | Path | None) -> Path:
    """``serve-device-journal.sqlite`` next to the token file, else in the current directory."""
    base = Path(token_file).resolve().parent if token_file is not None else Path.cwd()
    return base / "serve-device-journal.sqlite"


def serve(
    spec: str,
    device_kw: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token_file: str | Path | None = None,
    journal: str | Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    out=None,
    threads: int = 1,
) -> int:
    """``blackbox-sat serve-device``: load ``spec``, listen, print the address, serve until
    SIGINT/SIGTERM. Prints ``listening on tcp://HOST:PORT`` (with the port picked when 0)
    as its first stdout line, flushed.

    ``threads``: torch threads (0 keeps torch's default). One, as for trials: the device
    answers one small query at a time, and a thread pool per core only competes with the
    trainers on the same machine."""
    import signal
    import sys

    import torch

    from .spec import load_device

    if threads:
        torch.set_num_threads(threads)
    out = out or sys.stdout
    token = read_token(token_file)
    journal = Path(journal) if journal is not None else default_journal(token_file)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if spec.startswith("tcp://"):
        raise InvalidInput(
            "serve-device serves a local device; give a simulator or package.module:factory spec"
        )
    device = load_device(spec, **(device_kw or {}))
    try:
        server = DeviceServer(
            device,
            token,
            host=host,
            port=port,
            journal=journal,
            max_message_bytes=max_message_bytes,
            name=spec,
        )
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc}") from exc
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: traffic is not encrypted; tunnel it (ssh -L) across untrusted networks",
            host,
        )

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"listening on {server.url}", file=out, flush=True)
    print(
        f"device {spec}: n_params={server.info.n_params} in_dim={server.info.in_dim} out_dim={server.info.out_dim}; "
        f"journal {journal} ({len(server.journal)} results)",
        file=out,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print("serve-device stopped", file=out, flush=True)
    return 0
