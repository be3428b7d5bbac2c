"""The model-based tables: offline, offline-sat, nat and oracle on each built-in device.

Thin wrapper over ``blackbox_sat.harness.compare``: trains on chip seed 0 and evaluates on the
trained chip, the unseen chips 101-105 and over each device's sweep (docs/protocol.md).

    .venv/bin/python scripts/model_based_tables.py --out runs/tables --seeds 1
"""

import argparse

import blackbox_sat as bs
from blackbox_sat.harness.compare import summary_table

PRESETS = {
    "mzi16": ("mzi", {}, {}),
    "mzi32": ("mzi", {"n_modes": 32}, {}),
    "mzi32-hybrid": ("mzi", {"n_modes": 32}, {"pnn": "hybrid"}),
    "mrr": ("mrr", {}, {}),
    "freespace": ("freespace", {}, {}),
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/tables")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=list(PRESETS))
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    for name in args.only:
        device, kw, cfg = PRESETS[name]
        res = bs.compare(
            device,
            methods=["oracle", "offline", "offline-sat", "nat"],
            seeds=args.seeds,
            device_kw=kw,
            config=cfg,
            out=f"{args.out}/{name}",
            workers=args.workers,
        )
        print(f"\n## {name}\n")
        print(summary_table(res["summary"]))
