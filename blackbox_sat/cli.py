"""``blackbox-sat`` command line (DESIGN.md section 3)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .devices.spec import parse_kv


def _common(p: argparse.ArgumentParser, device_required: bool = True) -> None:
    p.add_argument("--device", required=device_required, help="mzi | mrr | freespace | package.module:factory | tcp://host:port")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE", help="device keyword (Python literal)")
    p.add_argument("--task", default="digits", help="digits | iris | wine | fashion-mnist | FILE.npz")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blackbox-sat", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method on one device")
    _common(p, device_required=False)
    p.add_argument("--method", default="blackbox-sat")
    p.add_argument("--budget", type=int, default=2000, help="device settings (calls of query)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue a killed run")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("evaluate", help="accuracy of a trained run on a device instance")
    p.add_argument("--run", required=True)
    p.add_argument("--device", help="default: the training device")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the result here")

    p = sub.add_parser("check-device", help="validate a device adapter against the contract")
    p.add_argument("spec")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=5)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; every completed query is in the ledger", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"blackbox-sat {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "train":
        from .training import resume, train

        if args.resume:
            result = resume(args.resume, progress=not args.quiet)
        else:
            if not args.device or not args.out:
                raise ValueError("train needs --device and --out (or --resume DIR)")
            result = train(args.device, task=args.task, method=args.method, budget=args.budget, seed=args.seed,
                           out=args.out, device_kw=parse_kv(args.device_kw), config=parse_kv(args.set),
                           progress=not args.quiet)
        keys = ("method", "device", "seed", "accuracy", "val_accuracy", "settings_used", "samples_used", "wall_s")
        print(json.dumps({k: result[k] for k in keys}))
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate

        res = evaluate(args.run, args.device, parse_kv(args.device_kw))
        text = json.dumps(res)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return 0
    if args.command == "check-device":
        from .devices.check import check_device
        from .devices.spec import load_device

        report = check_device(load_device(args.spec, **parse_kv(args.device_kw)), repeats=args.repeats)
        for k, v in report.items():
            print(f"{k:>14}: {v}")
        print("OK: the device satisfies the contract")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
