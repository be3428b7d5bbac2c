"""What a new user meets first, on an adapter with the four contract members only: inputs
refused before a run folder exists or the device is queried, no dead folders, a resume that
refuses what it would otherwise ignore, a curve that starts at theta0, runs usable from any
folder, check-device's warnings, and a progress line that names the phase."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat import cli
from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.check import check_device, format_report
from blackbox_sat.devices.contract import InvalidInput, MissingCapability, UserError
from blackbox_sat.harness.compare import summarise, summary_table
from blackbox_sat.methods.registry import METHODS, MethodResult, register
from blackbox_sat.training.config import RunConfig

from .conftest import make_ctx
from .toy_devices import Bare, bare

BARE = "tests.toy_devices:bare"


def _train(out, *extra, method="spsa", task="iris", budget="40"):
    """``blackbox-sat train`` on the bare adapter; a flag in ``extra`` wins over these."""
    given = dict(zip(extra[::2], extra[1::2]))
    argv = ["train", "--device", BARE, "--method", method]
    argv += [] if "--task" in given else ["--task", task]
    argv += [] if "--budget" in given else ["--budget", budget]
    return cli.main([*argv, "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize(
    "method,extra,expect",
    [
        ("blackbox-sat", ["--set", "rho=abc"], "rho='abc': expected float"),
        (
            "spsa",
            ["--device-kw", "noise=abc"],
            "noise='abc': 'tests.toy_devices:bare' expects float",
        ),
        ("spsa", ["--device-kw", "nosie=0.1"], "did you mean 'noise'"),
        ("spsa", ["--budget", "0"], "budget must be an int >= 1"),
        ("spsa", ["--task", "digits"], "10 classes but tests.toy_devices:bare has only 3 outputs"),
        ("harmonic", [], "needs periodic parameters"),
        ("oracle", [], "needs a true_model()"),
    ],
)
def test_bad_input_exits_2_in_one_line_before_any_folder_or_query(
    tmp_path, capsys, method, extra, expect
):
    out, before = tmp_path / "run", Bare.queries
    assert _train(out, *extra, method=method) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert not out.exists() and Bare.queries == before


def test_a_setup_failure_leaves_no_folder_and_the_out_stays_usable(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--device-kw", "flat=True") == 2  # calibration: outputs do not vary
    assert "do not vary" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder the user made: kept, but emptied of what the failed run wrote
    assert _train(out, "--device-kw", "flat=True") == 2
    assert list(out.iterdir()) == []
    assert _train(out) == 0 and (out / "result.json").exists()


def test_overwrite_replaces_a_run_and_resume_refuses_what_it_would_ignore(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    assert _train(out) == 2 and "--overwrite" in capsys.readouterr().err
    assert _train(out, "--overwrite", budget="30") == 0
    assert json.loads((out / "result.json").read_text())["budget"] == 30
    (out / "result.json").unlink()  # as if killed before the end
    for extra in (["--set", "lr=0.1"], ["--budget", "50"], ["--method", "ng-cma"]):
        assert cli.main(["train", "--resume", str(out), *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--resume continues a run as configured; it refuses" in err and extra[0] in err
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["budget"] == 30 and result["replayed_settings"] >= 29


@dataclass(frozen=True)
class StillConfig(RunConfig):
    pass


@pytest.fixture
def still_method():
    @register("test-still", StillConfig)
    def still(ctx):  # spends the budget but never moves: every curve point is theta0's
        while ctx.device.remaining:
            ctx.device.query(ctx.theta0, ctx.device_inputs(ctx.f_train[:8]), purpose="train")
            ctx.snapshot(ctx.theta0)
        return MethodResult(ctx.theta0.copy())

    yield
    METHODS.pop("test-still")


def test_curve_starts_at_0_settings_with_the_accuracy_of_theta0(tmp_path, still_method):
    kw = dict(task="iris", method="test-still", budget=8, progress=False)
    with pytest.raises(InvalidInput, match="too small to measure the step unit"):
        bs.train(bare(), out=tmp_path / "small", **kw)  # no bounds: a scale is measured first
    r = bs.train(bare(), out=tmp_path / "run", config={"scale": 1.0}, **kw)
    assert [c["settings"] for c in r["curve"]] == [0, 1, 2, 4, 8]
    assert r["curve"][0]["accuracy"] == r["accuracy"]  # noise-free and unmoved: theta0's
    assert r["chance"] == pytest.approx(1 / 3)


def test_evaluate_from_any_folder_and_a_device_object_run_asks_for_the_device(
    tmp_path, monkeypatch, capsys
):
    data = load_task("iris")
    monkeypatch.chdir(tmp_path)
    np.savez(
        "mine.npz",
        x_train=data.x_train,
        y_train=data.y_train,
        x_test=data.x_test,
        y_test=data.y_test,
    )
    assert _train(tmp_path / "spec", task="mine.npz") == 0
    obj = bs.train(bare(), task="iris", method="spsa", budget=20, out="obj", progress=False)
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the relative task path no longer resolves
    assert bs.evaluate(tmp_path / "spec")["n_test"] == len(data.y_test)
    with pytest.raises(MissingCapability, match="trained on a device object .Bare.*pass the"):
        bs.evaluate(obj)
    assert bs.evaluate(obj, bare())["accuracy"] == obj["accuracy"]  # noise-free
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(tmp_path / "obj")]) == 2
    err = capsys.readouterr().err
    assert "pass the device" in err and "unknown device spec" not in err


def test_check_device_warns_and_leaks_no_runtime_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (inf - inf) would raise here
        quiet, noisy = check_device(bare()), check_device(bare(noise=3.0))
    assert any("no `bounds`" in w for w in quiet["warnings"])
    assert any("no `input_bounds`" in w for w in quiet["warnings"])
    assert not any("low snr" in w for w in quiet["warnings"])
    assert any("low snr" in w for w in noisy["warnings"])
    text = "\n".join(format_report(quiet))
    assert " ms per query" in text and "(assumed: the device declares none)" in text


class Bar:
    """Stands in for the tqdm bar: records what the progress line said."""

    def __init__(self):
        self.lines = []

    def set_postfix_str(self, text, refresh=True):
        self.lines.append(text)

    def refresh(self):
        pass


def test_progress_names_the_phase_the_device_loss_and_theta0_beside_chance():
    ctx = make_ctx(bare(), budget=50)
    ctx.progress = Bar()
    ctx.device.observers.append(ctx._observe)
    ctx.start_curve(ctx.theta0)
    assert "acc at theta0" in ctx.progress.lines[-1] and "(chance 33%)" in ctx.progress.lines[-1]
    x = ctx.device_inputs(ctx.f_train[:16])
    ctx.device.query(ctx.theta0, x, purpose="probe")
    assert ctx.progress.lines[-1].startswith("initial design | device loss ")
    ctx.phase("surrogate fit")
    assert ctx.progress.lines[-1].startswith("surrogate fit")
    ctx.phase("round 1")
    ctx.device.query(ctx.theta0, x, purpose="refine")
    assert ctx.progress.lines[-1].startswith("refinement | device loss ")


def test_summary_gives_no_settings_to_target_for_a_method_at_chance():
    rows = [
        {"method": m, "seed": 0, "status": "ok", "acc_chip": a, "curve_250": a, "curve_500": a}
        for m, a in [("spsa", 0.5), ("blackbox-sat", 0.8), ("ng-cma", 0.11), ("pat", 0.105)]
    ]
    s = summarise(rows, chance=0.1, n_test=500)  # 3 standard errors: 0.1 + 0.040
    assert s["blackbox-sat"]["settings_to_target"] == 250 and s["spsa"]["target"] == 0.5
    assert s["pat"]["at_chance"] and s["pat"]["settings_to_target"] is None
    assert "- (at chance)" in summary_table(s) and not s["spsa"]["at_chance"]


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"config": {"rhoo": 1}}, "did you mean 'rho'"),
        ({"methods": ["spsa", "harmonic"]}, "needs periodic parameters"),
        ({"device_kw": {"noise": "abc"}}, "expects float"),
    ],
)
def test_compare_refuses_bad_input_before_its_folder(tmp_path, kw, expect):
    before = Bare.queries
    args = {"methods": ["spsa"], "task": "iris", "seeds": 1, "budget": 20, "progress": False}
    with pytest.raises(UserError, match=re.escape(expect)):
        bs.compare(BARE, out=tmp_path / "cmp", **{**args, **kw})
    assert not (tmp_path / "cmp").exists() and Bare.queries == before
