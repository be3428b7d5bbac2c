"""train / evaluate / CLI end to end on small simulated devices."""

import json

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat.cli import main

FAST = {"epochs": 25, "lr_grid": [0.1], "patience": 10}


def test_oracle_trains_and_evaluates(tmp_path):
    r = bs.train(
        "mzi",
        task="iris",
        method="oracle",
        out=tmp_path / "o",
        device_kw={"n_modes": 4},
        config=FAST,
        progress=False,
    )
    for key in (
        "method",
        "task",
        "device",
        "seed",
        "accuracy",
        "val_accuracy",
        "settings_used",
        "samples_used",
        "wall_s",
        "curve",
        "sharpness",
        "config",
    ):
        assert key in r
    assert r["accuracy"] > 0.6 and r["settings_used"] == 0 and r["sharpness"] > 0
    assert r["config"]["lr_grid"] == [0.1] and r["config"]["pnn"] == "device"
    assert len(r["extra"]["val_curve"]) >= 1
    same = bs.evaluate(r)
    assert abs(same["accuracy"] - r["accuracy"]) < 0.1  # only read noise differs
    assert np.load(tmp_path / "o" / "theta.npy").shape == (12,)
    with pytest.raises(FileExistsError, match="finished run"):
        bs.train(
            "mzi",
            task="iris",
            method="oracle",
            out=tmp_path / "o",
            device_kw={"n_modes": 4},
            progress=False,
        )


def test_model_based_method_refuses_black_box_device(tmp_path):
    with pytest.raises(TypeError, match="black-box device"):
        bs.train(
            "tests.toy_devices:opaque",
            task="iris",
            method="offline",
            out=tmp_path / "x",
            progress=False,
        )


def test_unknown_set_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown --set key"):
        bs.train(
            "mzi",
            task="iris",
            method="oracle",
            out=tmp_path / "x",
            config={"learning_rate": 1},
            progress=False,
        )


def test_hybrid_pnn_round_trips_through_model_json(tmp_path):
    r = bs.train(
        "mrr",
        task="wine",
        method="oracle",
        out=tmp_path / "h",
        device_kw={"in_dim": 6, "out_dim": 4},
        config={**FAST, "lr_grid": [0.01], "pnn": "hybrid"},
        progress=False,
    )
    model = json.loads((tmp_path / "h" / "model.json").read_text())
    assert model["mode"] == "hybrid" and "digital" in model
    quiet = {"in_dim": 6, "out_dim": 4, "noise": 0.0, "programming_noise": 0.0, "dac_bits": None}
    a, b = bs.evaluate(r, "mrr", quiet), bs.evaluate(tmp_path / "h", "mrr", quiet)
    assert a["accuracy"] == b["accuracy"] and a["accuracy"] > 0.7  # chance is 0.33


def test_cli_train_evaluate_check_device(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                "--device",
                "mzi",
                "--device-kw",
                "n_modes=4",
                "--task",
                "iris",
                "--method",
                "oracle",
                "--set",
                "epochs=5",
                "--set",
                "lr_grid=[0.1]",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((out / "result.json").read_text())
    # The printed line is the run's result, and 5 epochs of the oracle beat iris's chance (1/3)
    # by a wide margin (0.71 measured for seed 0).
    assert line["method"] == "oracle" and line["accuracy"] == stored["accuracy"]
    assert line["accuracy"] > 0.5
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(out),
                "--device-kw",
                "seed=101",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "e.json").read_text())
    # The CLI's file holds what the Python call measures on the same unseen chip.
    assert evaluated == bs.evaluate(out, device_kw={"seed": 101})
    assert main(["check-device", "tests.toy_devices:opaque", "--device-kw", "noise=0.01"]) == 0
    report = capsys.readouterr().out
    assert "n_params" in report and "noise_std" in report and "OK" in report
    assert (
        main(["train", "--device", "nope", "--method", "oracle", "--out", str(tmp_path / "n")]) == 2
    )
    assert "unknown device spec" in capsys.readouterr().err


def test_robust_objective_keeps_the_widest_radius_the_validation_set_cannot_fault(tmp_path):
    from blackbox_sat.methods.model_based import ROBUST_RADII

    res = bs.train(
        "mzi",
        task="iris",
        method="oracle-sat",
        budget=10,
        seed=0,
        out=tmp_path / "r",
        device_kw={"n_modes": 4},
        config={"objective": "robust", "epochs": 20, "lr_grid": [0.1]},
        progress=False,
    )
    search = res["extra"]["radius_search"]
    val, rho, tol = search["val"], search["rho"], search["tolerance"]
    assert set(val) == {f"{r:g}" for r in ROBUST_RADII}
    best = max(val.values())
    assert val[f"{rho:g}"] >= best - tol  # the kept radius costs nothing resolvable
    wider = [r for r in ROBUST_RADII if r > rho]
    assert all(val[f"{r:g}"] < best - tol for r in wider)  # and is the widest that does not
    assert res["accuracy"] > res["chance"]
