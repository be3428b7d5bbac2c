"""``make run``: a quick preset of ``compare`` on the built-in ``mzi`` (N=16, sigma 0.15).

Model-based methods (oracle, offline, offline-sat, nat) beside the fast device-query
baselines spsa and ng-cma: one training seed, the benchmark budget of 2000 settings, two
worker processes. The surrogate methods take minutes per run on 2 cores; compare them with
``blackbox-sat compare --methods ...`` (see README).

Trains every method of the preset on chip seed 0, evaluates each on that chip, on the
unseen chips 101-105 and over the drift sweep, and prints the summary table. Runs already
finished in ``runs/quickstart`` are reused; delete the folder to start afresh.
"""
from __future__ import annotations

import argparse
import time

from .compare import compare, summary_table
from blackbox_sat.methods.registry import method_names

PRESET_METHODS = ("oracle", "offline", "offline-sat", "nat", "spsa", "ng-cma")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--device", default="mzi")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--budget", type=int, default=2000, help="device settings")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    methods = [m for m in PRESET_METHODS if m in method_names()]
    t0 = time.perf_counter()
    res = compare(args.device, methods=methods, seeds=args.seeds, budget=args.budget, out=args.out,
                  workers=args.workers)
    print()
    print(summary_table(res["summary"]))
    print(f"\n{args.device}, digits, seeds {args.seeds}: {time.perf_counter() - t0:.0f} s; "
          f"details in {args.out}/summary.md and {args.out}/results.csv")


if __name__ == "__main__":
    main()
