"""The comparison harness on the local backend: skipping, failures, summary and plots."""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat.cli import main
from blackbox_sat.devices.contract import InvalidInput
from blackbox_sat.harness.compare import summarise
from blackbox_sat.harness.trials import Study, trial_config
from blackbox_sat.methods.registry import METHODS, MethodResult, register
from blackbox_sat.training.config import RunConfig

TINY = dict(
    task="iris",
    seeds=2,
    budget=60,
    device_kw={"n_modes": 4},
    unseen=(101,),
    sweep={"drift": [0.5]},
    progress=False,
)


@pytest.fixture(scope="module", autouse=True)
def flaky_method():
    @dataclass(frozen=True)
    class FlakyConfig(RunConfig):
        fail_seed: int = 1

    @register("test-flaky", FlakyConfig)
    def flaky(ctx):
        if ctx.seed == ctx.config.fail_seed:
            raise RuntimeError("instrument fell over")
        theta = ctx.theta0.copy()
        for _ in range(3):
            ctx.device.query(theta, ctx.device_inputs(ctx.f_train[:8]), purpose="train")
            ctx.snapshot(theta)
        return MethodResult(theta)

    yield
    METHODS.pop("test-flaky")


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/*/result.json"))}


def test_rerun_into_the_same_folder_skips_finished_trials(tmp_path):
    cfg = {"epochs": 3, "lr_grid": [0.1]}
    first = bs.compare("mzi", methods=["offline"], out=tmp_path, config=cfg, **TINY)
    before = _mtimes(tmp_path)
    assert len(before) == 2 and all(r["status"] == "ok" for r in first["rows"])
    with pytest.warns(UserWarning, match="reusing 2 finished trial"):
        again = bs.compare("mzi", methods=["offline"], out=tmp_path, config=cfg, **TINY)
    assert _mtimes(tmp_path) == before
    assert [r["acc_chip"] for r in again["rows"]] == [r["acc_chip"] for r in first["rows"]]
    # A model-based method has no accuracy-against-settings curve, so no curves.png.
    expected = {"results.csv", "summary.md", "sweep.png", "unseen.png", "sigma.png"}
    assert {Path(f).name for f in again["files"]} == expected
    assert all((tmp_path / name).is_file() for name in expected)
    assert not (tmp_path / "curves.png").exists()


def test_trials_of_another_configuration_are_refused_or_rerun(tmp_path, capsys):
    cfg = {"epochs": 3, "lr_grid": [0.1]}
    bs.compare("mzi", methods=["offline"], out=tmp_path, config=cfg, **TINY)
    before, study = _mtimes(tmp_path), (tmp_path / "study.json").read_text()
    other = {**TINY, "unseen": (102,)}
    with pytest.raises(InvalidInput, match=r"offline-seed0 differs in config\.epochs, unseen;"):
        bs.compare("mzi", methods=["offline"], out=tmp_path, config={**cfg, "epochs": 4}, **other)
    assert _mtimes(tmp_path) == before and (tmp_path / "study.json").read_text() == study
    # the stored configuration is the resolved one: a default that changed since counts too
    row = tmp_path / "trials" / "offline-seed1.json"
    stored = json.loads(row.read_text())
    stored["trial"]["config"]["patience"] += 1
    row.write_text(json.dumps(stored))
    args = ["compare", "--device", "mzi", "--device-kw", "n_modes=4", "--task", "iris"]
    args += ["--methods", "offline", "--seeds", "2", "--budget", "60", "--unseen", "101"]
    args += ["--sweep", "drift=0.5", "--set", "epochs=3", "--set", "lr_grid=[0.1]"]
    args += ["--out", str(tmp_path), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "offline-seed1 differs in config.patience" in err and "offline-seed0" not in err
    assert "--rerun-changed" in err and _mtimes(tmp_path) == before
    # asked to, compare runs the changed trials afresh and keeps the unchanged one
    with pytest.warns(UserWarning, match="reusing 1 finished trial"):
        assert main([*args, "--rerun-changed"]) == 0
    after = _mtimes(tmp_path)
    seed0, seed1 = sorted(before)
    assert after[seed0] == before[seed0] and after[seed1] != before[seed1]
    assert json.loads(row.read_text())["trial"] == trial_config(
        next(
            Study(
                "mzi",
                ["offline"],
                [1],
                60,
                "iris",
                {"n_modes": 4},
                cfg,
                (101,),
                {"drift": [0.5]},
                str(tmp_path),
            ).trials()
        )
    )


def test_a_method_failing_on_one_seed_is_recorded_and_the_others_kept(tmp_path):
    res = bs.compare("mzi", methods=["test-flaky", "spsa"], out=tmp_path, **TINY)
    status = {(r["method"], r["seed"]): r["status"] for r in res["rows"]}
    assert status == {
        ("test-flaky", 0): "ok",
        ("test-flaky", 1): "failed",
        ("spsa", 0): "ok",
        ("spsa", 1): "ok",
    }
    failed = next(r for r in res["rows"] if r["status"] == "failed")
    assert "instrument fell over" in failed["error"]
    with open(tmp_path / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    summary = (tmp_path / "summary.md").read_text()
    assert "## Failed trials" in summary and "instrument fell over" in summary
    assert (
        res["summary"]["test-flaky"]["n_failed"] == 1 and res["summary"]["test-flaky"]["n_ok"] == 1
    )
    assert res["summary"]["spsa"]["settings_used"][0] <= 60


def test_settings_to_target_reads_the_curves():
    rows = [
        {"method": m, "seed": s, "status": "ok", "acc_chip": a, "curve_250": c1, "curve_500": c2}
        for m, s, a, c1, c2 in [
            ("spsa", 0, 0.5, 0.3, 0.5),
            ("spsa", 1, 0.5, 0.3, 0.5),
            ("blackbox-sat", 0, 0.8, 0.6, 0.8),
            ("blackbox-sat", 1, 0.8, 0.6, 0.8),
            ("ng-cma", 0, 0.2, 0.1, 0.2),
        ]
    ]
    s = summarise(rows)
    assert s["spsa"]["target"] == 0.5
    assert s["blackbox-sat"]["settings_to_target"] == 250 and s["spsa"]["settings_to_target"] == 500
    assert s["ng-cma"]["settings_to_target"] == "> 500"
    assert np.isclose(s["blackbox-sat"]["acc_chip"][0], 0.8)
