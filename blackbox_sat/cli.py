"""``blackbox-sat`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blackbox_sat.devices.contract import InvalidInput, UserError
from blackbox_sat.devices.spec import parse_kv

#: Shown by ``--help`` without importing torch; a test checks them against the registries.
METHODS = (
    "oracle",
    "oracle-sat",
    "offline",
    "offline-sat",
    "nat",
    "spsa",
    "ng-cma",
    "ng-ngopt",
    "ng-tbpsa",
    "blackbox-sat",
    "blackbox",
    "pat",
    "insitu-sat",
    "harmonic",
    "guided-es",
    "twin",
    "twin-sat",
    "dat",
)
TASKS = ("digits", "iris", "wine", "fashion-mnist")
EPILOG = (
    f"methods: {', '.join(METHODS)}. tasks: {', '.join(TASKS)}, or FILE.npz with x_train, y_train, x_test, "
    "y_test. --set takes dotted keys (--set refine.rule=spsa, --set surrogate.hyper.max_steps=3000); "
    "a wrong key or value is refused before any setting is spent."
)
Formatter = argparse.ArgumentDefaultsHelpFormatter
#: ``train`` options that would change a run, so ``--resume`` refuses them.
RESUME_REFUSES = ("method", "budget", "task", "seed", "set")
TRAIN_DEFAULTS: dict = {"method": "blackbox-sat", "budget": 2000, "task": "digits", "seed": 0}


def _common(p: argparse.ArgumentParser, device_required: bool = True) -> None:
    p.add_argument(
        "--device",
        required=device_required,
        help="mzi | mrr | freespace | package.module:factory | tcp://host:port",
    )
    p.add_argument(
        "--device-kw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="device keyword (Python literal)",
    )
    p.add_argument(
        "--task", default="digits", help="digits | iris | wine | fashion-mnist | FILE.npz"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter"
    )
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    ap = argparse.ArgumentParser(
        prog="blackbox-sat", description=__doc__, epilog=EPILOG, formatter_class=Formatter
    )
    ap.add_argument(
        "--version", action="version", version=f"blackbox-sat {version('blackbox-sat')}"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train one method on one device", epilog=EPILOG, formatter_class=Formatter
    )
    _common(p, device_required=False)
    for action in p._actions:  # absent unless given, so that --resume can refuse them
        if action.dest in RESUME_REFUSES:
            action.help = f"{action.help or ''} (default: {action.default!r})".strip()
            action.default = argparse.SUPPRESS
    p.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help="one of the methods below (default: 'blackbox-sat')",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=argparse.SUPPRESS,
        help="device settings (calls of query), >= 1 (default: 2000)",
    )
    p.add_argument("--out", help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a killed run exactly as configured in DIR/config.json; --device (and "
        "--device-kw) may say where the device is now, e.g. tcp://host:NEWPORT; --method, --task, "
        "--seed, --set and --budget are refused (start a new run with --out to change them)",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from another run's theta and gain (and a twin method's calibration.pt)",
    )
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser(
        "evaluate",
        help="accuracy of a trained run on a device instance",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("--run", required=True)
    p.add_argument("--device", help="default: the training device")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the result here")

    p = sub.add_parser(
        "compare",
        help="every method on the same device, budget and seeds",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    _common(p)
    p.add_argument("--methods", required=True, help="comma-separated method names")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..K-1")
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--unseen", help="unseen chips as seed=101,102,... (default 101-105; 'none' to skip)"
    )
    p.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2,...", help="device keyword sweep"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel trial processes (local); CPUs of a locally started Ray instance (ray, when > 1)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="where trials run: this machine, or Ray tasks (pip install 'blackbox-sat[ray]')",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="ray: HOST:PORT of an existing cluster's head (default: start Ray here)",
    )
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="rerun finished trials in --out whose configuration differs (default: refuse)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the trials, runs, tables and plots already in --out, and run every trial afresh",
    )
    p.add_argument(
        "--recalibrate",
        type=int,
        metavar="K",
        help="also move each trial's setting to every unseen chip and report it as-is, after a "
        "K-setting recalibration (twin runs: `twin --set settings=K`; others: K settings of spsa) "
        "and against the chip's oracle: fleet.csv and a summary.md section",
    )
    p.add_argument(
        "--finetune",
        type=int,
        metavar="F",
        help="with --recalibrate K: also a fine-tune to K + F settings per chip (twin runs: "
        "twin-sat; others: spsa)",
    )
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser(
        "collect",
        help="measure a designed set of queries into a ledger",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("--device", required=True)
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--settings", type=int, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--around", metavar="THETA.npy", help="centre of a trust region")
    where.add_argument("--random", action="store_true", help="Sobol over the whole box")
    p.add_argument("--radius", type=float, default=0.05, help="L-inf radius in bound widths")
    p.add_argument("--inputs", type=int, default=64, help="training inputs per setting")
    p.add_argument("--task", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = sub.add_parser(
        "fit-surrogate",
        help="fit a surrogate from logged queries, report held-out error",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("--ledger", required=True)
    p.add_argument(
        "--kind",
        default="hyper",
        help="hyper | hyper-additive | mlp | interferometric | gp | calibrated | calibrated+residual",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="surrogate option; calibrated kinds: model=package.module:function",
    )
    p.add_argument("--out", required=True, help="file for the fitted surrogate")
    p.add_argument(
        "--device", help="the simulator the ledger came from (default: the ledger's record)"
    )
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "check-device",
        help="validate a device adapter against the contract",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("spec")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=5)

    p = sub.add_parser(
        "serve-device",
        help="serve a device over TCP (token required; see docs/design.md)",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    p.add_argument("--device", required=True, help="mzi | mrr | freespace | package.module:factory")
    p.add_argument("--device-kw", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--token-file", help="file holding the token (default: $BLACKBOX_SAT_TOKEN)")
    p.add_argument(
        "--journal", help="durable request journal (default: next to the token file, or ./)"
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest message (default 64 MiB)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the served device (0: torch's default, one per core)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; every completed query is in the ledger", file=sys.stderr)
        return 130
    except (
        UserError,
        FileNotFoundError,
        FileExistsError,
    ) as exc:  # bad input; a bug keeps its traceback
        print(f"blackbox-sat {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "train":
        from blackbox_sat.harness.run import resume, train

        given = [k for k in RESUME_REFUSES if hasattr(args, k)]
        if args.resume:  # --device/--device-kw: where the device is now (e.g. a new port)
            if given or args.out or args.overwrite or (args.device_kw and not args.device):
                bad = [f"--{k}" for k in given] + [
                    f for f, on in (("--out", args.out), ("--overwrite", args.overwrite)) if on
                ]
                raise InvalidInput(
                    f"--resume continues a run as configured; it refuses {', '.join(bad) or '--device-kw without --device'} "
                    "(start a new run with --out to change them)"
                )
            result = resume(
                args.resume,
                device=args.device,
                device_kw=parse_kv(args.device_kw),
                progress=not args.quiet,
            )
        else:
            if not args.device or not args.out:
                raise InvalidInput("train needs --device and --out (or --resume DIR)")
            result = train(
                args.device,
                task=getattr(args, "task", TRAIN_DEFAULTS["task"]),
                method=getattr(args, "method", TRAIN_DEFAULTS["method"]),
                budget=getattr(args, "budget", TRAIN_DEFAULTS["budget"]),
                seed=getattr(args, "seed", TRAIN_DEFAULTS["seed"]),
                out=args.out,
                device_kw=parse_kv(args.device_kw),
                config=parse_kv(getattr(args, "set", [])),
                progress=not args.quiet,
                overwrite=args.overwrite,
                init_from=args.init_from,
            )
        keys = (
            "method",
            "device",
            "seed",
            "accuracy",
            "val_accuracy",
            "settings_used",
            "samples_used",
            "wall_s",
        )
        print(json.dumps({k: result[k] for k in keys}))
        _wrote(Path(result["out"]), RUN_FILES)
        return 0
    if args.command == "evaluate":
        from blackbox_sat.harness.evaluate import evaluate

        res = evaluate(args.run, args.device, parse_kv(args.device_kw))
        text = json.dumps(res)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
            _wrote(Path("."), [args.json])
        return 0
    if args.command == "compare":
        from blackbox_sat.harness.compare import compare, summary_table

        res = compare(
            args.device,
            task=args.task,
            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
            seeds=args.seeds,
            budget=args.budget,
            out=args.out,
            device_kw=parse_kv(args.device_kw),
            config=parse_kv(args.set),
            unseen=_parse_unseen(args.unseen),
            sweep=_parse_sweep(args.sweep),
            workers=args.workers,
            progress=not args.quiet,
            backend=args.backend,
            address=args.address,
            rerun_changed=args.rerun_changed,
            overwrite=args.overwrite,
            recalibrate=args.recalibrate,
            finetune=args.finetune,
        )
        print(summary_table(res["summary"]))
        if res["fleet"]:
            from blackbox_sat.harness.fleet import fleet_table

            print(fleet_table(res["fleet"]))
        print("wrote " + ", ".join(res["files"]))
        return 0
    if args.command == "collect":
        import numpy as np

        from blackbox_sat.harness.collect import collect

        around = None if args.random else np.load(args.around)
        res = collect(
            args.device,
            args.settings,
            args.out,
            around=around,
            radius=args.radius,
            inputs=args.inputs,
            task=args.task,
            seed=args.seed,
            device_kw=parse_kv(args.device_kw),
        )
        print(json.dumps(res))
        _wrote(Path(args.out), ["ledger.sqlite"])
        return 0
    if args.command == "fit-surrogate":
        from blackbox_sat.harness.collect import fit_surrogate, write_report

        rep = fit_surrogate(
            args.ledger,
            kind=args.kind,
            out=args.out,
            device=args.device,
            device_kw=parse_kv(args.device_kw) or None,
            seed=args.seed,
            surrogate_kw=parse_kv(args.set),
        )
        write_report(rep, str(args.out) + ".json")
        print(json.dumps(rep))
        _wrote(Path("."), [str(args.out), str(args.out) + ".json"])
        for line in rep["warnings"]:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    if args.command == "check-device":
        from blackbox_sat.devices.check import check_device, format_report
        from blackbox_sat.devices.spec import load_device

        report = check_device(
            load_device(args.spec, **parse_kv(args.device_kw)), repeats=args.repeats
        )
        print("\n".join(format_report(report)))
        print("OK: the device satisfies the contract")
        return 0
    if args.command == "serve-device":
        from blackbox_sat.devices.serve_device import serve

        return serve(
            args.device,
            parse_kv(args.device_kw),
            host=args.host,
            port=args.port,
            token_file=args.token_file,
            journal=args.journal,
            max_message_bytes=args.max_message_bytes,
            threads=args.threads,
        )
    raise AssertionError(args.command)


#: What a finished ``train`` run folder holds (harness/run.py).
RUN_FILES = ("config.json", "task.npz", "ledger.sqlite", "model.json", "theta.npy", "result.json")


def _wrote(folder: Path, names) -> None:
    """Name every file a command wrote (on stderr: stdout stays one JSON line)."""
    paths = [folder / n for n in names]
    print("wrote " + ", ".join(str(p) for p in paths if p.exists()), file=sys.stderr)


def _parse_unseen(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    body = text.split("=", 1)[1] if "=" in text else text
    return tuple(int(v) for v in body.split(",") if v.strip())


def _parse_sweep(items: list[str]) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, _, values = item.partition("=")
        out[key.strip()] = [parse_kv([f"v={x}"])["v"] for x in values.split(",") if x.strip()]
    return out


if __name__ == "__main__":
    sys.exit(main())
