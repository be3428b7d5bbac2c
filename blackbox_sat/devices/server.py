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

**Journal.** Every successful query's result is written to the durable journal
(:mod:`.journal`) before the reply is sent; a query whose id is in it is answered from it.
The ``serve-device`` command (token, journal file, signals) is in :mod:`.serve_device`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import socketserver
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
from .journal import Journal
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


class _Refused(Exception):
    """A request answered with an error reply; ``close`` also ends the connection."""

    def __init__(self, etype: str, message: str, close: bool = False):
        super().__init__(message)
        self.etype, self.message, self.close = etype, message, close


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
