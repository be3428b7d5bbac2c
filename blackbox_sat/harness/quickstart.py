"""``make run``: a short comparison of the toolkit's own method on a device it handles.

On the built-in ``mrr`` microring bank (chip seed 0, digits): the black-box pipeline
``blackbox-sat`` beside the gradient-free baselines ``spsa`` and ``ng-cma``, and the
``oracle`` (exact gradients through the chip's true model) as the limit. One training seed,
1000 settings, two worker processes; each setting is also evaluated on the unseen chips
101-105 and over the thermal-drift sweep. Finished trials in ``runs/quickstart`` are reused;
delete the folder to start afresh.
"""

from __future__ import annotations

import argparse
import time

from .compare import compare, summary_table

PRESET_METHODS = ("oracle", "blackbox-sat", "spsa", "ng-cma")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--device", default="mrr")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1000, help="device settings per run")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = compare(
        args.device,
        methods=list(PRESET_METHODS),
        seeds=args.seeds,
        budget=args.budget,
        out=args.out,
        workers=args.workers,
    )
    print()
    print(summary_table(res["summary"]))
    print(
        f"\n{args.device}, digits, {args.seeds} seed(s), {args.budget} settings: {time.perf_counter() - t0:.0f} s"
    )
    print("wrote " + ", ".join(res["files"]))
    print(
        "next: your own device with `blackbox-sat check-device mymodule:make_device`, then "
        "`blackbox-sat train --device mymodule:make_device --method blackbox-sat --out runs/mine` "
        '(README, "Your first hour on your own device"); more seeds: `--seeds 3`.'
    )


if __name__ == "__main__":
    main()
