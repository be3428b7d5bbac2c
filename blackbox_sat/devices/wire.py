"""The wire format of a served device, shared by the client (:mod:`.remote`) and the server
(:mod:`.server`): frames, arrays, request ids, the query digest and ``tcp://`` specs.

Wire protocol, version 1 (also in docs/design.md, "Wire protocol (version 1)"). Standard library
only: a frame is a 4-byte unsigned big-endian length ``N`` then ``N`` bytes of UTF-8 JSON
(one object, strict JSON: no NaN/Infinity literals). ``N`` is at most the server's
``--max-message-bytes`` (default :data:`DEFAULT_MAX_MESSAGE_BYTES`, 64 MiB); a larger
header is answered with an error and the connection closed before the body is read.
Arrays travel as ``{"dtype": "<f8", "shape": [...], "b64": base64(little-endian float64,
C order)}``; requests may instead give a nested JSON list of numbers.

Request: ``{"v": 1, "token": T, "kind": "info"|"query"|"stats", "id": ID, "theta": ARRAY,
"x": ARRAY}`` (``id``, ``theta`` and ``x`` for queries). Reply: ``{"v": 1, "id": ID,
"status": "ok", ...}`` with ``info``, ``y`` (+ ``journal``: true when answered from the
journal) or ``stats``; or ``{"v": 1, "id": ID, "status": "error", "error": {"type": TYPE,
"message": TEXT}}`` with TYPE in :data:`ERROR_TYPES`.

A query's request id (1-128 characters of ``A-Z a-z 0-9 . _ : -``, :data:`REQUEST_ID_RE`)
is unique per distinct query and reused when it is retried; :func:`query_digest` guards it
(the server refuses an id reused for a different ``theta``/``x``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
from typing import Literal, overload
from urllib.parse import urlsplit

import numpy as np

from .contract import DeviceContractError

PROTOCOL_VERSION = 1
#: Environment variable holding the shared token (client and server).
TOKEN_ENV = "BLACKBOX_SAT_TOKEN"
#: Largest frame body accepted by default, both ways (64 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: ``error.type`` values of an error reply.
ERROR_TYPES = ("auth", "too_large", "bad_request", "contract", "device", "busy", "internal")
#: Valid request ids.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
#: A frame's header: the body's length, 4-byte unsigned big-endian.
HEADER = struct.Struct(">I")


def encode_array(a) -> dict:
    """An array as ``{"dtype": "<f8", "shape": [...], "b64": ...}``."""
    arr = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
    return {
        "dtype": "<f8",
        "shape": list(arr.shape),
        "b64": base64.b64encode(arr.tobytes()).decode("ascii"),
    }


def decode_array(obj, name: str) -> np.ndarray:
    """An array from its wire form (the dict above, or a nested list of numbers).

    Raises :class:`DeviceContractError` naming ``name`` when it is neither. Values are not
    checked here: :mod:`.contract` does that.
    """
    if isinstance(obj, dict):
        dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("b64")
        if (
            dtype not in ("<f8", "float64")
            or not isinstance(data, str)
            or not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise DeviceContractError(
                f"{name} must be {{'dtype': '<f8', 'shape': [ints], 'b64': base64 little-endian float64}} or a list of numbers"
            )
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise DeviceContractError(f"{name}.b64 is not valid base64: {exc}") from exc
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if len(raw) != 8 * count:
            raise DeviceContractError(
                f"{name} holds {len(raw)} bytes but shape {shape} needs {8 * count}"
            )
        return np.frombuffer(raw, "<f8").reshape(shape).astype(float)
    if isinstance(obj, (list, int, float)) and not isinstance(obj, bool):
        try:
            return np.asarray(obj)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DeviceContractError(
                f"{name} is not a rectangular array of numbers: {exc}"
            ) from exc
    raise DeviceContractError(
        f"{name} must be an array ({{'dtype','shape','b64'}} or a list of numbers), "
        f"got {type(obj).__name__}"
    )


def query_digest(theta: np.ndarray, x: np.ndarray) -> str:
    """sha256 of a query's ``theta`` and ``x`` (float64 bytes and shapes): guards request ids."""
    h = hashlib.sha256()
    for a in (theta, x):
        a = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} is not allowed (strict JSON)")


def loads(body: bytes):
    """Strict JSON (no NaN/Infinity)."""
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)


def pack(obj) -> bytes:
    """One frame: 4-byte big-endian length, then strict JSON."""
    body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return HEADER.pack(len(body)) + body


@overload
def recv_exact(sock: socket.socket, n: int, eof_ok: Literal[False] = False) -> bytes: ...
@overload
def recv_exact(sock: socket.socket, n: int, eof_ok: bool) -> bytes | None: ...
def recv_exact(sock: socket.socket, n: int, eof_ok: bool = False) -> bytes | None:
    """Read exactly ``n`` bytes; ``None`` on a clean EOF before the first byte if ``eof_ok``."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@overload
def read_header(sock: socket.socket, eof_ok: Literal[False] = False) -> int: ...
@overload
def read_header(sock: socket.socket, eof_ok: bool) -> int | None: ...
def read_header(sock: socket.socket, eof_ok: bool = False) -> int | None:
    """The length in a frame's header; ``None`` on a clean EOF before it if ``eof_ok``."""
    head = recv_exact(sock, HEADER.size, eof_ok=eof_ok)
    return None if head is None else HEADER.unpack(head)[0]


def parse_url(spec: str) -> tuple[str, int]:
    parts = urlsplit(spec)
    try:
        port = parts.port
    except ValueError as exc:
        raise DeviceContractError(f"bad device spec {spec!r}: {exc}") from exc
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise DeviceContractError(f"bad device spec {spec!r}: expected tcp://host:port")
    return parts.hostname, port
