"""Every registered method on one device, same budget, minibatches and seeds.

Thin wrapper over ``blackbox_sat.harness.compare`` (the protocol of docs/protocol.md lives there):

    .venv/bin/python scripts/compare_baselines.py --device mzi --seeds 3 --workers 2 --out runs/cmp-mzi
    .venv/bin/python scripts/compare_baselines.py --device mrr --methods spsa,ng-cma,oracle --seeds 1
"""

import argparse

import blackbox_sat as bs
from blackbox_sat.harness.compare import summary_table

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="mzi")
    ap.add_argument(
        "--methods", default=",".join(bs.method_names()), help="default: every registered method"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="runs/compare-baselines")
    args = ap.parse_args()
    res = bs.compare(
        args.device,
        methods=args.methods.split(","),
        seeds=args.seeds,
        budget=args.budget,
        out=args.out,
        workers=args.workers,
    )
    print(summary_table(res["summary"]))
    print(f"\nfull report: {args.out}/summary.md")
