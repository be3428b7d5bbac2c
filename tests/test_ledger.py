"""The ledger keeps every completed row through a SIGKILL of its writer."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from blackbox_sat.devices.ledger import Ledger, LedgerError

WRITER = r"""
import sys, numpy as np
from blackbox_sat.devices.ledger import Ledger
led = Ledger(sys.argv[1])
i = 0
while True:
    theta = np.full(7, float(i)); x = np.full((3, 2), float(i)); y = np.full((3, 4), float(i))
    led.append(theta, x, y, "train", request_id=f"r{i}")
    print(i, flush=True)
    i += 1
"""


def test_roundtrip_and_counts(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        led.append(np.arange(3.0), np.ones((2, 4)), np.zeros((2, 5)), "train")
        led.append(np.arange(3.0), np.ones((3, 4)), None, "probe", ok=False, error="NaN")
        led.append(np.arange(3.0), np.ones((5, 4)), np.ones((5, 5)), "eval")
        c = led.counts()
        assert (c["settings"], c["samples"], c["eval_settings"], c["bad"], c["rows"]) == (
            2,
            5,
            1,
            1,
            3,
        )
        theta, x, y, _ids = led.samples()
        assert (
            theta.shape == (2, 3) and x.shape == (2, 4) and y.shape == (2, 5)
        )  # the bad row is skipped
        rows = list(led.rows())
        assert (
            [r.purpose for r in rows] == ["train", "probe", "eval"]
            and rows[1].y is None
            and not rows[1].ok
        )


def test_bad_purpose_rejected(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led, pytest.raises(ValueError, match="purpose"):
        led.append(np.zeros(2), np.zeros((1, 2)), np.zeros((1, 2)), "training")


def test_corrupt_file_gives_clear_error(tmp_path):
    p = tmp_path / "ledger.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a readable SQLite ledger"):
        Ledger(p)


@pytest.mark.parametrize("after", [20, 200, 1000])
def test_sigkill_keeps_every_completed_row(tmp_path, after):
    """SIGKILL the writer once it has acknowledged ``after`` rows: it is then in the middle of
    further appends, at a point set by its own progress rather than by a timer."""
    path = tmp_path / "ledger.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    acked = -1
    while acked < after:
        line = proc.stdout.readline()
        assert line, "the writer exited before it was killed"
        acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read().split()
    acked = int(rest[-1]) if rest else acked
    with Ledger(path) as led:
        rows = list(led.rows())
    ids = [int(r.request_id[1:]) for r in rows]
    assert ids == list(range(len(ids)))  # complete, in order, no gaps
    assert len(ids) >= acked + 1  # every acknowledged write is there
    for r in rows:  # and every row is whole
        i = float(r.request_id[1:])
        assert np.all(r.theta == i) and r.x.shape == (3, 2) and np.all(r.y == i)
