"""The durable journal of a device server: request id -> measured result.

Every successful query's result is written, before the reply is sent, to a
SQLite file in WAL mode (``journal``: table ``journal(request_id TEXT PRIMARY KEY, time,
digest, batch, out_dim, y BLOB)``, ``y`` little-endian float64). A query whose id is in the
journal is answered from it (reply ``"journal": true``) without touching the device, also
after a server restart on the same file; a retry that arrives while its first attempt is
still being measured waits for that attempt. An id reused with a different ``theta``/``x``
is refused. Failed calls (device raised, NaN, wrong shape) are not journaled: a retry of one
measures again. The journal grows by one row per measured query (``y`` bytes plus ~150 B).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

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


def default_journal(token_file: str | Path | None) -> Path:
    """``serve-device-journal.sqlite`` next to the token file, else in the current directory."""
    base = Path(token_file).resolve().parent if token_file is not None else Path.cwd()
    return base / "serve-device-journal.sqlite"
