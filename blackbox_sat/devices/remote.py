"""A device served over TCP: the ``tcp://host:port`` client.

``RemoteDevice("tcp://host:port")`` talks to ``blackbox-sat serve-device`` (see
:mod:`.server`) and offers the device contract, so
:class:`~.metered.MeteredDevice`, :func:`~.contract.describe` and every method use it
unchanged. The members are fetched once, by an ``info`` request, when it is made.

The wire format (frames, arrays, requests and replies, error types) is in :mod:`.wire`.

**Request ids.** A query's id (1-128 characters of ``A-Z a-z 0-9 . _ : -``) is unique per
distinct query and reused when the query is retried. The server keeps a durable journal of
id -> result, so a retried id is answered from it, never measured or counted twice, even
after a server restart. Bound to a run's ledger (:meth:`RemoteDevice.bind_ledger`, done by
:class:`~.metered.MeteredDevice` for ``train`` and ``collect``), ids are ``<run namespace>:<good ledger rows + 1>:<digest of theta and x>``: a
resumed run re-sends the query that was in flight when it was killed under the same id and
gets the already-paid measurement back from the journal.

**Retries.** Connection errors (refused, reset, closed before the reply, connect timeout)
and a busy server are retried ``retries`` times with exponential backoff
(``backoff * 2**k``, capped at ``max_backoff``), on a new connection, with the same id.
Validation and device errors are not retried: they raise at once, naming the member. A
reply that does not come within ``timeout`` seconds (a hung instrument) raises
:class:`DeviceTimeoutError` at once (``retry_on_timeout=True`` retries it too: the server
then waits for the call already in flight instead of measuring again).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid

import numpy as np

from .contract import (
    DeviceContractError,
    DeviceOutputError,
    check_inputs,
    check_outputs,
    check_theta,
    describe,
)
from .wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    decode_array,
    encode_array,
    loads,
    pack,
    parse_url,
    query_digest,
    read_header,
    recv_exact,
)


class RemoteDeviceError(DeviceOutputError):
    """The device server answered with a protocol-level error (too large, bad request)."""


class RemoteAuthError(RemoteDeviceError):
    """The device server refused the token, or no token was given."""


class DeviceConnectionError(DeviceOutputError, ConnectionError):
    """The device server could not be reached, even after the retries."""


class DeviceTimeoutError(DeviceOutputError, TimeoutError):
    """The device server gave no reply within the timeout (a hung instrument)."""


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------
class _Retryable(Exception):
    """Internal: an error after which the request may be sent again."""

    stale = False


class RemoteDevice:
    """A device served by ``blackbox-sat serve-device``, reached at ``tcp://host:port``.

    ``token``: the server's shared token (default: ``$BLACKBOX_SAT_TOKEN``). ``timeout``:
    seconds to wait for one reply. ``retries``/``backoff``/``max_backoff``: reconnection
    after connection errors (see the module docstring). ``connect_timeout``: seconds for one
    connection attempt (default ``min(timeout, 5)``). Thread-safe: one request at a time.
    """

    def __init__(
        self,
        spec: str,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        connect_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_on_timeout: bool = False,
    ):
        self.url = spec
        self.host, self.port = parse_url(spec)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise RemoteAuthError(
                f"no token for the device server at {spec}: set {TOKEN_ENV} to the token the server was started "
                "with (or pass --device-kw token=...)"
            )
        self._token = str(token)
        self.timeout, self.retries, self.backoff, self.max_backoff = (
            float(timeout),
            int(retries),
            float(backoff),
            float(max_backoff),
        )
        self.connect_timeout = (
            float(connect_timeout) if connect_timeout is not None else min(self.timeout, 5.0)
        )
        self.max_message_bytes, self.retry_on_timeout = (
            int(max_message_bytes),
            bool(retry_on_timeout),
        )
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._namespace = uuid.uuid4().hex
        self._counter = 0
        self._ledger = None
        #: Request id of the last successful query, and client counters.
        self.last_request_id: str | None = None
        self.journal_hits = 0
        self.reconnects = 0
        reply = self._call({"kind": "info"})
        self._set_members(reply.get("info"))
        self.server = reply.get("server", {})
        self._info = describe(self)

    # --- contract members ------------------------------------------------------------------
    def _set_members(self, info) -> None:
        try:
            self.n_params, self.in_dim, self.out_dim = (
                int(info["n_params"]),
                int(info["in_dim"]),
                int(info["out_dim"]),
            )
            b = info.get("bounds")
            self.bounds = (
                None
                if b is None
                else (decode_array(b[0], "bounds[0]"), decode_array(b[1], "bounds[1]"))
            )
            self.periodic = np.asarray(info.get("periodic", False), dtype=bool)
            ib = info.get("input_bounds")
            self.input_bounds = (
                None
                if ib is None
                else (
                    decode_array(ib[0], "input_bounds[0]"),
                    decode_array(ib[1], "input_bounds[1]"),
                )
            )
            self.max_batch = None if info.get("max_batch") is None else int(info["max_batch"])
            self.theta0 = (
                None if info.get("theta0") is None else decode_array(info["theta0"], "theta0")
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RemoteDeviceError(
                f"the device server at {self.url} sent an unusable info reply: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"RemoteDevice({self.url!r}, n_params={self.n_params}, in_dim={self.in_dim}, out_dim={self.out_dim})"

    def __getstate__(self):
        raise TypeError(
            "a RemoteDevice holds a connection and cannot be pickled; pass the tcp:// spec instead"
        )

    # --- request ids -----------------------------------------------------------------------
    def bind_ledger(self, ledger) -> None:
        """Derive request ids from ``ledger`` (a :class:`~.ledger.Ledger`) so that they
        survive a kill: ``<namespace>:<good rows + 1>:<digest>``, the namespace stored in the
        ledger's meta. A metered device with a ledger calls this; without it ids are random
        per client."""
        ns = ledger.get_meta("request_namespace")
        if ns is None:
            ns = uuid.uuid4().hex
            ledger.set_meta("request_namespace", ns)
        self._namespace, self._ledger = str(ns), ledger

    def _request_id(self, theta: np.ndarray, x: np.ndarray) -> str:
        if self._ledger is not None:
            try:
                c = self._ledger.counts()
            except sqlite3.ProgrammingError:  # that run is over and its ledger closed
                self._ledger, self._namespace = None, uuid.uuid4().hex
            else:
                return f"{self._namespace}:{c['rows'] - c['bad'] + 1}:{query_digest(theta, x)[:16]}"
        self._counter += 1
        return f"{self._namespace}:{self._counter}"

    # --- the contract call -----------------------------------------------------------------
    def query(self, theta, x) -> np.ndarray:
        """Program ``theta (n_params,)`` and measure ``x (batch, in_dim)`` on the served device."""
        theta = check_theta(self._info, theta)
        x = check_inputs(self._info, x)
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise DeviceContractError(
                f"x has batch {x.shape[0]} > device.max_batch = {self.max_batch}; split it "
                "(MeteredDevice does)"
            )
        rid = self._request_id(theta, x)
        reply = self._call(
            {"kind": "query", "id": rid, "theta": encode_array(theta), "x": encode_array(x)}
        )
        try:
            y = decode_array(reply["y"], "y")
        except (KeyError, DeviceContractError) as exc:
            raise RemoteDeviceError(
                f"the device server at {self.url} sent an unusable reply to {rid}: {exc}"
            ) from exc
        y = check_outputs(self._info, y, x.shape[0])
        self.journal_hits += bool(reply.get("journal"))
        self.last_request_id = rid
        return y

    def stats(self) -> dict:
        """The server's counters (``device_calls``, ``journal_hits``, ``journal_rows``, ...)."""
        return self._call({"kind": "stats"})["stats"]

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __del__(self):
        with contextlib.suppress(Exception):
            self._drop()

    # --- transport -------------------------------------------------------------------------
    def _drop(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.create_connection(
                    (self.host, self.port), timeout=self.connect_timeout
                )
            except OSError as exc:  # refused, unreachable, connect timeout
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def _exchange(self, frame: bytes) -> dict:
        """Send one frame and read its reply on the current connection."""
        reused = self._sock is not None
        sock = self._connect()
        try:
            sock.settimeout(self.timeout)
            sock.sendall(frame)
            n = read_header(sock)
            if n > self.max_message_bytes:
                raise RemoteDeviceError(
                    f"the device server at {self.url} sent a {n}-byte reply, over this client's "
                    f"max_message_bytes = {self.max_message_bytes}"
                )
            return loads(recv_exact(sock, n))
        except TimeoutError:
            self._drop()
            raise
        except (ConnectionError, OSError) as exc:
            self._drop()
            err = _Retryable(f"{type(exc).__name__}: {exc}")
            err.stale = reused
            raise err from exc
        except (ValueError, RemoteDeviceError):
            self._drop()
            raise

    def _call(self, request: dict) -> dict:
        request = {"v": PROTOCOL_VERSION, "token": self._token, **request}
        rid, kind = request.get("id"), request["kind"]
        frame = pack(request)
        if len(frame) - HEADER.size > self.max_message_bytes:
            raise RemoteDeviceError(
                f"{kind} request of {len(frame)} bytes exceeds max_message_bytes = "
                f"{self.max_message_bytes}; use smaller batches (device max_batch)"
            )
        t0, attempt, fresh_retry = time.monotonic(), 0, True
        with self._lock:
            while True:
                try:
                    reply = self._exchange(frame)
                except TimeoutError as exc:
                    if not self.retry_on_timeout or attempt >= self.retries:
                        raise DeviceTimeoutError(
                            f"the device server at {self.url} gave no reply to {kind} {rid or ''} within "
                            f"{self.timeout:g} s: the device may be hung. If the call completes, the server keeps its "
                            "result in its journal under that request id. Check the instrument, raise "
                            "--device-kw timeout=SECONDS for a slow device, then continue with "
                            f"`blackbox-sat train --resume {self._run_dir()}`"
                        ) from exc
                    last = f"no reply within {self.timeout:g} s"
                except _Retryable as exc:
                    last = str(exc)
                    if (
                        exc.stale and fresh_retry
                    ):  # the server closed a kept-alive connection (idle, restart):
                        fresh_retry = False  # reconnect at once, once, without counting a retry
                        self.reconnects += 1
                        continue
                except ValueError as exc:  # unparseable reply
                    raise RemoteDeviceError(
                        f"the device server at {self.url} sent a malformed reply: {exc}"
                    ) from exc
                else:
                    if reply.get("status") == "ok":
                        if rid is not None and reply.get("id") != rid:
                            self._drop()
                            raise RemoteDeviceError(
                                f"reply id {reply.get('id')!r} does not match request {rid!r}"
                            )
                        return reply
                    err = reply.get("error") or {}
                    etype, message = err.get("type"), str(err.get("message", "no message"))
                    if etype != "busy":
                        raise self._error(etype, message, kind, rid)
                    last = f"server busy: {message}"
                attempt += 1
                if attempt > self.retries:
                    raise DeviceConnectionError(
                        f"cannot reach the device server at {self.url}: {attempt} attempts over "
                        f"{time.monotonic() - t0:.1f} s failed (last: {last}). No measured query is lost: completed "
                        "ones are in the run's ledger and the server's journal. Restart the server "
                        "(`blackbox-sat serve-device ...` with the same --journal), then continue with "
                        f"`blackbox-sat train --resume {self._run_dir()}`; --device-kw retries=N backoff=S "
                        "rides out longer outages"
                    )
                self.reconnects += 1
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))

    def _run_dir(self) -> str:
        return str(self._ledger.path.parent) if self._ledger is not None else "DIR"

    def _error(self, etype, message: str, kind: str, rid) -> Exception:
        where = f"device server at {self.url}" + (f", request {rid}" if rid else "")
        if etype == "contract":
            return DeviceContractError(f"{message} ({where})")
        if etype == "device":
            return DeviceOutputError(f"served device: {message} ({where})")
        if etype == "auth":
            return RemoteAuthError(
                f"the {where} refused the token ({message}); set {TOKEN_ENV} to the token the "
                "server was started with"
            )
        return RemoteDeviceError(f"{kind} refused by the {where}: [{etype}] {message}")
