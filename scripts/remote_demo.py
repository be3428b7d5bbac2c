"""Kill and resume against a served device, scripted.

1. ``blackbox-sat serve-device`` serves a simulated MRR chip on 127.0.0.1 (a subprocess);
2. ``blackbox-sat train --method spsa`` trains against ``tcp://...`` (a subprocess);
3. once the ledger holds ``--kill-at`` rows, the trainer is SIGKILLed;
4. ``blackbox-sat train --resume DIR`` finishes the run;
5. the final ledger is checked against the server's journal and against an uninterrupted
   run on a fresh, identical chip.

Prints the queries lost (measured by the device but missing from the ledger) and the
settings re-measured after the resume (device calls beyond one per ledger row).

    .venv/bin/python scripts/remote_demo.py --budget 600 --kill-at 200
"""

import argparse
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import blackbox_sat as bs
from blackbox_sat.devices.remote import RemoteDevice
from blackbox_sat.devices.server import DeviceServer
from blackbox_sat.devices.wire import query_digest

DEVICE = ["--device", "mrr", "--device-kw", "in_dim=4", "--device-kw", "out_dim=3"]


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "blackbox_sat.cli", *args], **kw)


def ledger_rows(path):
    with bs.Ledger(path) as ledger:
        return list(ledger.rows())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budget", type=int, default=600)
    ap.add_argument(
        "--kill-at",
        type=int,
        default=200,
        help="SIGKILL the trainer once the ledger has this many rows",
    )
    ap.add_argument("--task", default="iris")
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="remote-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token)
    (work / "token").chmod(0o600)
    env = {**os.environ, "BLACKBOX_SAT_TOKEN": token}
    journal, out = work / "journal.sqlite", work / "run"
    train_args = [
        "--task",
        args.task,
        "--method",
        "spsa",
        "--budget",
        str(args.budget),
        "--seed",
        "0",
        "--quiet",
    ]

    with open(work / "server.log", "wb") as log:  # the child keeps its own handle
        server = cli(
            "serve-device",
            *DEVICE,
            "--port",
            "0",
            "--token-file",
            str(work / "token"),
            "--journal",
            str(journal),
            stdout=subprocess.PIPE,
            stderr=log,
        )
    url = re.search(r"tcp://\S+", server.stdout.readline().decode()).group(0)
    print(
        f"1. serving mrr (in_dim=4, out_dim=3) at {url}; journal {journal}; log {work / 'server.log'}"
    )
    try:
        trainer = cli(
            "train",
            "--device",
            url,
            "--out",
            str(out),
            *train_args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        print(f"2. training spsa on {args.task}, budget {args.budget} settings, into {out}")
        rows = 0
        while trainer.poll() is None and rows < args.kill_at:
            time.sleep(0.01)
            if (out / "ledger.sqlite").exists():
                with sqlite3.connect(out / "ledger.sqlite") as db:
                    rows = db.execute("SELECT count(*) FROM queries").fetchone()[0]
        if trainer.poll() is not None:
            sys.exit(
                f"the run ended before the kill (rc {trainer.returncode}); lower --kill-at or raise --budget"
            )
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        at_kill = len(ledger_rows(out / "ledger.sqlite"))
        print(f"3. SIGKILLed the trainer with {at_kill} rows in the ledger")

        t0 = time.perf_counter()
        resumed = cli(
            "train",
            "--resume",
            str(out),
            "--quiet",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = resumed.communicate()
        if resumed.returncode != 0:
            sys.exit(f"resume failed: {stderr.decode()}")
        print(
            f"4. resumed and finished in {time.perf_counter() - t0:.1f} s: {stdout.decode().strip()}"
        )
        stats = RemoteDevice(url, token=token).stats()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    rows = ledger_rows(out / "ledger.sqlite")
    result = bs.resume(out)  # the run is finished: this only reads result.json
    with sqlite3.connect(journal) as db:
        measured = Counter(d for (d,) in db.execute("SELECT digest FROM journal"))
    logged = Counter(query_digest(r.theta, r.x) for r in rows if r.ok)
    lost = sum((measured - logged).values())
    re_measured = stats["device_calls"] - len([r for r in rows if r.ok])

    # the same run, uninterrupted, on a fresh identical chip (in-process server)
    with DeviceServer(bs.load_device("mrr", in_dim=4, out_dim=3), token) as ref_server:
        bs.train(
            ref_server.url,
            task=args.task,
            method="spsa",
            budget=args.budget,
            seed=0,
            out=work / "reference",
            progress=False,
            device_kw={"token": token},
        )
    ref = ledger_rows(work / "reference" / "ledger.sqlite")
    identical = len(ref) == len(rows) and all(
        a.purpose == b.purpose
        and np.array_equal(a.theta, b.theta)
        and np.array_equal(a.x, b.x)
        and np.array_equal(a.y, b.y)
        for a, b in zip(rows, ref)
    )

    print("5. check")
    print(
        f"   ledger rows {len(rows)} = settings_used {result['settings_used']} + eval {result['eval_settings']} "
        f"(budget {args.budget}); bad rows {result['bad_queries']}"
    )
    print(
        f"   device calls on the server {stats['device_calls']}, answered from the journal {stats['journal_hits']}, "
        f"replayed from the ledger on resume {result['replayed_settings']}"
    )
    print(f"   queries lost: {lost}")
    print(f"   settings re-measured after resume: {re_measured}")
    print(f"   final ledger identical to an uninterrupted run (theta, x, y, purpose): {identical}")
    sys.exit(0 if lost == 0 and re_measured == 0 and identical else 1)
