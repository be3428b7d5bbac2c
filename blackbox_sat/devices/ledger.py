"""The query ledger: one crash-safe SQLite file per run, one row per device call.

SQLite in WAL mode commits every row in its own transaction, so a ``SIGKILL`` of the
writer at any instant leaves every completed row readable (the half-written transaction
is rolled back on the next open). ``synchronous=NORMAL`` survives process crashes;
pass ``durable=True`` for ``FULL``, which also survives power loss at one fsync a row.

On-disk format (readable without blackbox_sat, see docs/design.md): table ``queries`` with
columns ``id`` (1, 2, ... in call order), ``request_id`` (unique text), ``time`` (Unix s),
``purpose`` (probe/train/refine/calibrate/eval), ``ok`` (1 ok, 0 bad), ``error``,
``n_params``, ``batch``, ``in_dim``, ``out_dim`` and ``theta``, ``x``, ``y`` as
little-endian float64 bytes (``numpy.frombuffer(row, '<f8')``), ``y`` NULL for a bad row.
Table ``meta`` holds key/value text (the run's config, the device spec).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PURPOSES = ("probe", "train", "refine", "calibrate", "eval")
CHARGED = ("probe", "train", "refine", "calibrate")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY,
    request_id TEXT UNIQUE NOT NULL,
    time REAL NOT NULL,
    purpose TEXT NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    n_params INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    in_dim INTEGER NOT NULL,
    out_dim INTEGER NOT NULL,
    theta BLOB NOT NULL,
    x BLOB NOT NULL,
    y BLOB
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LedgerError(RuntimeError):
    """The ledger file is unreadable or does not match this run."""


@dataclass(frozen=True)
class LedgerRow:
    id: int
    request_id: str
    time: float
    purpose: str
    ok: bool
    error: str | None
    theta: np.ndarray
    x: np.ndarray
    y: np.ndarray | None


def _blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


class Ledger:
    """Append-only store of device calls. ``Ledger(path)`` opens or creates ``path``."""

    def __init__(self, path: str | Path, durable: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            self._db.execute("SELECT count(*) FROM queries").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(
                f"ledger {self.path} is not a readable SQLite ledger ({exc}). Move it aside and start a new run "
                "directory; `sqlite3 FILE .recover` can salvage rows from a damaged file"
            ) from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- writing -------------------------------------------------------------------------
    def append(
        self,
        theta: np.ndarray,
        x: np.ndarray,
        y: np.ndarray | None,
        purpose: str,
        ok: bool = True,
        error: str | None = None,
        request_id: str | None = None,
    ) -> int:
        """Write one call in its own transaction and return its row id."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
        theta, x = np.asarray(theta, float), np.atleast_2d(np.asarray(x, float))
        out_dim = 0 if y is None else np.asarray(y).shape[-1]
        cur = self._db.execute(
            "INSERT INTO queries (request_id, time, purpose, ok, error, n_params, batch, in_dim, out_dim, theta, x, y)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                request_id or uuid.uuid4().hex,
                time.time(),
                purpose,
                int(ok),
                error,
                theta.size,
                x.shape[0],
                x.shape[1],
                out_dim,
                _blob(theta),
                _blob(x),
                None if y is None else _blob(y),
            ),
        )
        assert cur.lastrowid is not None, "an INSERT sets the row id"
        return int(cur.lastrowid)

    def set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # --- reading -------------------------------------------------------------------------
    def counts(self) -> dict:
        """``settings`` and ``samples`` charged to the budget (all but ``eval``, bad rows
        included since they were paid for), plus ``eval_settings``, ``bad`` and ``rows``."""
        q = "SELECT count(*), coalesce(sum(batch),0) FROM queries WHERE purpose IN ({})".format(
            ",".join("?" * len(CHARGED))
        )
        settings, samples = self._db.execute(q, CHARGED).fetchone()
        ev = self._db.execute("SELECT count(*) FROM queries WHERE purpose='eval'").fetchone()[0]
        bad = self._db.execute("SELECT count(*) FROM queries WHERE ok=0").fetchone()[0]
        rows = self._db.execute("SELECT count(*) FROM queries").fetchone()[0]
        return {
            "settings": settings,
            "samples": samples,
            "eval_settings": ev,
            "bad": bad,
            "rows": rows,
        }

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM queries").fetchone()[0]

    def rows(self, purposes=None, ok_only: bool = False, after_id: int = 0):
        """Iterate :class:`LedgerRow` in call order."""
        sql = "SELECT id, request_id, time, purpose, ok, error, theta, x, y, batch, in_dim, out_dim FROM queries WHERE id > ?"
        args: list = [after_id]
        if purposes is not None:
            purposes = (purposes,) if isinstance(purposes, str) else tuple(purposes)
            sql += " AND purpose IN ({})".format(",".join("?" * len(purposes)))
            args += purposes
        if ok_only:
            sql += " AND ok=1"
        for r in self._db.execute(sql + " ORDER BY id", args):
            batch, in_dim, out_dim = r[9], r[10], r[11]
            y = None if r[8] is None else np.frombuffer(r[8], "<f8").reshape(batch, out_dim)
            yield LedgerRow(
                r[0],
                r[1],
                r[2],
                r[3],
                bool(r[4]),
                r[5],
                np.frombuffer(r[6], "<f8").copy(),
                np.frombuffer(r[7], "<f8").reshape(batch, in_dim),
                y,
            )

    def find(self, request_id: str) -> LedgerRow | None:
        row = self._db.execute(
            "SELECT id FROM queries WHERE request_id=?", (request_id,)
        ).fetchone()
        return None if row is None else next(self.rows(after_id=row[0] - 1))

    def samples(self, purposes=("probe", "train", "refine", "calibrate")):
        """Good rows flattened to per-sample arrays for surrogate fitting.

        Returns ``theta (N, n_params)``, ``x (N, in_dim)``, ``y (N, out_dim)`` and
        ``setting (N,)``, the ledger row id each sample came from.
        """
        thetas, xs, ys, ids = [], [], [], []
        for r in self.rows(purposes, ok_only=True):
            b = r.x.shape[0]
            thetas.append(np.broadcast_to(r.theta, (b, r.theta.size)))
            xs.append(r.x)
            ys.append(r.y)
            ids.append(np.full(b, r.id))
        if not thetas:
            raise LedgerError(f"ledger {self.path} holds no good rows with purpose in {purposes}")
        return np.concatenate(thetas), np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)
