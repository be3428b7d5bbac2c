"""Cost of remoteness: one query of a batch of 128 through ``tcp://`` against in-process.

The same simulated chip is queried in this process and through ``blackbox-sat
serve-device`` (a separate process on 127.0.0.1, journal on disk), the two calls alternating
so that both see the same machine load. Both sides run torch on one thread (as ``train``
does; the simulators' small matrices are far slower with a thread pool). Prints the median
time of each over ``--calls`` calls, their ratio and the added milliseconds.

    .venv/bin/python scripts/remote_overhead.py --device mrr --calls 200
"""

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blackbox_sat as bs
from blackbox_sat.devices.remote import RemoteDevice
from blackbox_sat.devices.spec import parse_kv

if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device", default="mrr", help="a built-in simulator (default mrr: 16 inputs, 10 outputs)"
    )
    ap.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="remote-overhead-")
    work = Path(tmp.name)
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token)
    (work / "token").chmod(0o600)
    kw_args = [a for kv in args.device_kw for a in ("--device-kw", kv)]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blackbox_sat.cli",
            "serve-device",
            "--device",
            args.device,
            *kw_args,
            "--port",
            "0",
            "--token-file",
            str(work / "token"),
            "--journal",
            str(work / "journal.sqlite"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    torch.set_num_threads(1)
    try:
        url = re.search(r"tcp://\S+", server.stdout.readline().decode()).group(0)
        local = bs.load_device(args.device, **parse_kv(args.device_kw))
        remote = RemoteDevice(url, token=token)
        info = bs.describe(local)
        rng = np.random.default_rng(0)
        theta = info.start(0)
        xs = rng.uniform(
            info.input_low, info.input_high, (args.calls + 10, args.batch, info.in_dim)
        )
        t_local, t_remote = [], []
        for i, x in enumerate(xs):
            t0 = time.perf_counter()
            local.query(theta, x)
            t1 = time.perf_counter()
            remote.query(theta, x)
            t2 = time.perf_counter()
            if i >= 10:  # warm-up
                t_local.append(t1 - t0)
                t_remote.append(t2 - t1)
        stats = remote.stats()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        tmp.cleanup()
    med_local, med_remote = float(np.median(t_local)), float(np.median(t_remote))
    figures = {
        "device": args.device,
        "batch": args.batch,
        "calls": len(t_local),
        "in_process_ms": 1e3 * med_local,
        "remote_ms": 1e3 * med_remote,
        "added_ms": 1e3 * (med_remote - med_local),
        "ratio": med_remote / med_local,
        "remote_p90_ms": 1e3 * float(np.percentile(t_remote, 90)),
        "server_device_calls": stats["device_calls"],
    }
    print(f"{args.device}, batch {args.batch}, median of {len(t_local)} calls each, alternating:")
    print(f"  in-process  {figures['in_process_ms']:.3f} ms")
    print(f"  tcp://      {figures['remote_ms']:.3f} ms  (p90 {figures['remote_p90_ms']:.3f} ms)")
    print(f"  ratio       {figures['ratio']:.2f}x  (+{figures['added_ms']:.3f} ms per query)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
