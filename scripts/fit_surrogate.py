"""Surrogate quality on a simulator: held-out R² of the theta-driven output change and the
loss-gradient cosine, for each family and data size (thin wrapper over the public API).

    .venv/bin/python scripts/fit_surrogate.py --device mrr --kinds hyper,mlp --sizes 250,500,1000
    .venv/bin/python scripts/fit_surrogate.py --device mzi --kinds calibrated --sizes 10,20 \
        --random --set model=package.module:function

Warnings (held-out R² of the theta-driven change near zero, and what to change) go to stderr.
"""

import argparse
import json
import sys

import numpy as np

import blackbox_sat as bs
from blackbox_sat.devices.spec import parse_kv
from blackbox_sat.harness.collect import collect, fit_surrogate


def oracle_halfway(
    device: str, device_kw: dict, task: str, out: str, by: str = "epochs"
) -> np.ndarray:
    """``theta`` part-way through the oracle's best run, at the oracle's chosen lr: after half
    the epochs to its best (``by="epochs"``), or after the first epoch whose validation
    accuracy has covered half the way from the first epoch's to the best (``by="accuracy"``).
    With Adam the first is often nearly converged; the second is a point still far from it."""
    full = bs.train(
        device,
        task=task,
        method="oracle",
        device_kw=device_kw,
        out=f"{out}/full",
        progress=False,
        overwrite=True,
    )
    ex = full["extra"]
    curve = np.asarray(ex["val_curve"])
    best_epoch = int(np.argmax(curve)) + 1
    if by == "epochs":
        epochs = max(1, best_epoch // 2)
    else:
        midway = (curve[0] + curve.max()) / 2
        epochs = int(np.argmax(curve >= midway)) + 1
    half = bs.train(
        device,
        task=task,
        method="oracle",
        device_kw=device_kw,
        out=f"{out}/half-{by}",
        progress=False,
        overwrite=True,
        config={"lr_grid": [ex["chosen_lr"]], "epochs": epochs, "patience": 10**6},
    )
    print(
        json.dumps(
            {
                "oracle_best_epoch": best_epoch,
                "oracle_acc": full["accuracy"],
                "by": by,
                "halfway_epochs": epochs,
                "halfway_acc": half["accuracy"],
            }
        ),
        flush=True,
    )
    return np.load(f"{out}/half-{by}/theta.npy")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="mrr")
    ap.add_argument("--kinds", default="hyper,mlp")
    ap.add_argument("--sizes", default="250,500,1000")
    ap.add_argument("--radius", type=float, default=0.05)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument(
        "--centre",
        help="THETA.npy; 'oracle-half' (theta after half the epochs of an oracle run "
        "to its best); 'oracle-midway' (after the epoch at which the oracle's validation accuracy is "
        "halfway to its best: a point far from converged); default: the device's theta0",
    )
    ap.add_argument("--out", default="runs/surrogates")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="surrogate option, e.g. model=package.module:function for the calibrated kinds",
    )
    ap.add_argument(
        "--random", action="store_true", help="settings over the whole box (calibration's design)"
    )
    args = ap.parse_args()
    kw = parse_kv(args.device_kw)
    info = bs.describe(bs.load_device(args.device, **kw))
    if args.centre in ("oracle-half", "oracle-midway"):
        centre = oracle_halfway(
            args.device,
            kw,
            args.task,
            f"{args.out}/oracle",
            by="epochs" if args.centre == "oracle-half" else "accuracy",
        )
    else:
        centre = np.load(args.centre) if args.centre else info.start(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        d = f"{args.out}/{args.device}-{n}"
        collect(
            args.device,
            n,
            d,
            around=None if args.random else centre,
            radius=args.radius,
            inputs=args.inputs,
            task=args.task,
            device_kw=kw,
        )
        for kind in args.kinds.split(","):
            rep = fit_surrogate(
                f"{d}/ledger.sqlite",
                kind=kind,
                out=f"{d}/{kind}.pt",
                centre=centre,
                task=args.task,
                surrogate_kw=parse_kv(args.set),
            )
            for line in rep["warnings"]:
                print(f"warning ({kind}, {n} settings): {line}", file=sys.stderr)
            if "calibration" in rep:
                print(json.dumps({"kind": kind, "settings": n, **rep["calibration"]}), flush=True)
            rows.append({"settings": n, **rep})
            print(
                json.dumps(
                    {
                        k: rep[k]
                        for k in (
                            "kind",
                            "heldout_r2",
                            "heldout_r2_delta",
                            "grad_cosine",
                            "true_grad_turn",
                            "fit_s",
                        )
                        if k in rep
                    }
                    | {"settings": n}
                ),
                flush=True,
            )
    print(
        "\n| kind | settings | held-out R² (Δy) | grad cosine | true gradient's turn | fit s |\n"
        "|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['kind']} | {r['settings']} | {r.get('heldout_r2_delta', float('nan')):.3f} | "
            f"{r.get('grad_cosine', float('nan')):.3f} | {r.get('true_grad_turn', float('nan')):.3f} | "
            f"{r['fit_s']:.1f} |"
        )
