"""The black-box methods: budgets, accept/reject, and training a device nobody models."""

import json

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat.cli import main
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.methods import blackbox as blackbox_methods
from blackbox_sat.methods.registry import get_method
from blackbox_sat.sim.mzi import mzi
from blackbox_sat.training import physics_aware

from .conftest import make_ctx

FAST_FIT = {"surrogate": "hyper", "surrogate_kw": {"hyper": {"n_members": 2, "max_steps": 300}}}
SMALL = {
    "steps_per_round": 10,
    "probes_per_round": 4,
    "refit_steps": 30,
    "init_fraction": 0.25,
    **FAST_FIT,
}
OPAQUE = "tests.toy_devices:opaque"


@pytest.mark.parametrize(
    "method,cfg",
    [
        ("pat", FAST_FIT),
        ("blackbox", SMALL),
        ("blackbox-sat", {**SMALL, "ascent": "device"}),
    ],
)
def test_budget_never_exceeded_and_ledger_holds_every_query(tmp_path, method, cfg):
    r = bs.train(
        OPAQUE,
        task="iris",
        method=method,
        budget=120,
        out=tmp_path / method,
        config=cfg,
        progress=False,
    )
    with Ledger(tmp_path / method / "ledger.sqlite") as led:
        counts = led.counts()
        rows = list(led.rows())
    assert r["settings_used"] == counts["settings"] <= 120
    assert counts["settings"] >= 110  # the budget is used, not left idle
    assert len(rows) == counts["settings"] + counts["eval_settings"]
    assert {row.purpose for row in rows} >= {"calibrate", "probe", "train", "eval"}


def test_insitu_sat_uses_two_settings_per_step_and_stays_in_budget(tmp_path):
    common = dict(
        task="iris",
        method="insitu-sat",
        budget=61,
        device_kw={"in_dim": 4, "out_dim": 3},
        progress=False,
    )
    r = bs.train("mrr", out=tmp_path / "i", config={"ascent": "device"}, **common)
    assert r["settings_used"] <= 61 and r["extra"]["steps"] == 30  # 1 calibration + 30 x 2
    r = bs.train("mrr", out=tmp_path / "j", **common)  # default: the ascent pass on the model
    assert r["settings_used"] == 61 and r["extra"]["steps"] == 60


def test_insitu_sat_refuses_a_device_without_model(tmp_path):
    with pytest.raises(TypeError, match="approximate model"):
        bs.train(
            OPAQUE, task="iris", method="insitu-sat", budget=20, out=tmp_path / "x", progress=False
        )


def test_a_move_that_raises_the_device_loss_is_rejected(tmp_path, monkeypatch):
    real = physics_aware.physics_aware_step

    def uphill(*args, **kwargs):  # a surrogate whose gradient points the wrong way
        step = real(*args, **kwargs)
        step.grad = -step.grad
        return step

    monkeypatch.setattr("blackbox_sat.training.physics_aware.physics_aware_step", uphill)
    cfg = {**SMALL, "refine_fraction": 0.0, "lr_factor": 1.0, "radius": 0.2, "inner_steps": 0}
    r = bs.train(
        OPAQUE,
        task="iris",
        method="blackbox",
        budget=100,
        out=tmp_path / "u",
        config=cfg,
        progress=False,
    )
    assert r["extra"]["rounds"] >= 2 and r["extra"]["accepted_rounds"] < r["extra"]["rounds"]
    assert r["extra"]["final_radius"] < 0.2  # rejected rounds shrink the trust region


def test_own_device_trains_well_above_chance_through_the_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "--device",
            OPAQUE,
            "--task",
            "iris",
            "--method",
            "blackbox-sat",
            "--budget",
            "300",
            "--set",
            "steps_per_round=20",
            "--set",
            "probes_per_round=5",
            "--set",
            "refit_steps=50",
            "--set",
            "surrogate=hyper",
            "--set",
            "surrogate_kw={'hyper': {'n_members': 3, 'max_steps': 600}}",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accuracy"] > 0.75  # chance is 1/3
    result = json.loads((out / "result.json").read_text())
    assert result["extra"]["surrogate"] and result["settings_used"] <= 300


def test_hybrid_pnn_trains_its_digital_layers_through_the_device_methods(tmp_path):
    r = bs.train(
        "mrr",
        task="iris",
        method="insitu-sat",
        budget=200,
        out=tmp_path / "h",
        progress=False,
        device_kw={"in_dim": 4, "out_dim": 3},
        config={"pnn": "hybrid"},
    )
    model = json.loads((tmp_path / "h" / "model.json").read_text())
    readout = np.asarray(model["digital"]["readout.weight"])
    assert not np.allclose(
        readout, np.eye(*readout.shape)
    )  # the readout moved from its identity start
    assert (
        r["accuracy"] > 0.7 and bs.evaluate(r)["accuracy"] > 0.7
    )  # chance is 1/3; 45 noisy test rows


def test_a_refinement_that_raises_the_device_loss_is_dropped(tmp_path, monkeypatch):
    def wild(ctx, theta, n, **kw):  # a refinement that lands far away, at the bounds
        return ctx.info.project(
            np.where(theta > ctx.info.low + ctx.info.scale / 2, ctx.info.low, ctx.info.high)
        ), []

    monkeypatch.setattr("blackbox_sat.training.pipeline.refine", wild)
    cfg = {**SMALL, "refine_fraction": 0.1}
    r = bs.train(
        OPAQUE,
        task="iris",
        method="blackbox",
        budget=100,
        out=tmp_path / "w",
        config=cfg,
        progress=False,
    )
    ref = r["extra"]["refine"]
    assert ref["check_loss_after"] > ref["check_loss_before"] and ref["kept"] is False
    theta = np.load(tmp_path / "w" / "theta.npy")
    assert not (np.isclose(theta, 0) | np.isclose(theta, 1)).all()  # not the refinement's corner
    assert r["settings_used"] <= 100


def test_sat_radius_ramps_up_over_the_budget(tmp_path, monkeypatch):
    real, seen = physics_aware.physics_aware_step, []

    def record(ctx, theta, idx, stand_in, rho=0.0, **kw):
        seen.append((ctx.device.settings_used, rho))
        return real(ctx, theta, idx, stand_in, rho=rho, **kw)

    monkeypatch.setattr("blackbox_sat.training.physics_aware.physics_aware_step", record)
    # surrogate rounds only, and at these small budgets too (the budget rule would run spsa)
    cfg = {**SMALL, "refine_fraction": 0.0, "rho": 0.04, "steps": "surrogate", "min_rounds": 1}
    bs.train(
        OPAQUE,
        task="iris",
        method="blackbox-sat",
        budget=100,
        out=tmp_path / "r",
        config=cfg,
        progress=False,
    )
    _used, rho = np.array(seen).T
    assert rho.max() <= 0.04 and rho[0] < 0.015 and rho[-1] > 0.03  # small early, near rho late
    assert np.all(np.diff(rho) >= 0)  # never decreases
    seen.clear()
    bs.train(
        OPAQUE,
        task="iris",
        method="blackbox-sat",
        budget=60,
        out=tmp_path / "c",
        config={**cfg, "rho_ramp": 0},
        progress=False,
    )
    assert {r for _, r in seen} == {0.04}  # no ramp: the full radius from the first step


def test_refits_follow_the_family_rule_unless_the_user_sets_them(tmp_path, monkeypatch):
    from blackbox_sat.training.surrogate_choice import REFIT_BY_FAMILY
    from surrogates.neural import EnsembleSurrogate

    real, seen = EnsembleSurrogate.update, []

    def record(self, theta, x, y, groups=None, *, steps=None, **kw):
        seen.append((self.structure_name, steps, len(np.unique(groups))))
        return real(self, theta, x, y, groups, steps=steps, **kw)

    monkeypatch.setattr(EnsembleSurrogate, "update", record)
    common = dict(task="iris", budget=90, progress=False)
    small = {k: v for k, v in SMALL.items() if k != "refit_steps"}
    small["steps"] = "surrogate"  # no harmonic law test: this is about the surrogate's refits
    fast = {"n_members": 2, "max_steps": 200}
    interf = {
        **small,
        "surrogate": "interferometric",
        "refine_fraction": 0.0,
        "surrogate_kw": {"interferometric": fast},
    }
    bs.train(
        "mzi",
        device_kw={"n_modes": 4},
        method="blackbox",
        out=tmp_path / "i",
        config=interf,
        **common,
    )
    bs.train(
        "mzi",
        device_kw={"n_modes": 4},
        method="blackbox",
        out=tmp_path / "h",
        config={**small, "refine_fraction": 0.0},
        **common,
    )
    assert {s for f, s, _ in seen if f == "interferometric"} == {
        REFIT_BY_FAMILY["interferometric"]["refit_steps"]
    }
    assert {s for f, s, _ in seen if f == "hyper"} == {REFIT_BY_FAMILY["default"]["refit_steps"]}
    seen.clear()
    bs.train(
        "mzi",
        device_kw={"n_modes": 4},
        method="blackbox",
        out=tmp_path / "u",
        config={**interf, "refit_steps": 7, "refit_window": 12},
        **common,
    )
    assert seen and all(s == 7 and n <= 12 for _, s, n in seen)  # the user's numbers win


def test_rejected_rounds_in_a_row_refit_the_surrogate_from_scratch(tmp_path, monkeypatch):
    from surrogates.neural import EnsembleSurrogate

    real_step, real_fit, fits = physics_aware.physics_aware_step, EnsembleSurrogate.fit, []

    def uphill(*args, **kwargs):  # a surrogate whose gradient points the wrong way: rounds fail
        step = real_step(*args, **kwargs)
        step.grad = -step.grad
        return step

    def count(self, theta, *args, **kw):
        fits.append(len(theta))
        return real_fit(self, theta, *args, **kw)

    monkeypatch.setattr("blackbox_sat.training.physics_aware.physics_aware_step", uphill)
    monkeypatch.setattr(EnsembleSurrogate, "fit", count)
    cfg = {
        **SMALL,
        "refine_fraction": 0.0,
        "lr_factor": 1.0,
        "radius": 0.2,
        "inner_steps": 0,
        "refit_window": 20,
        "refresh_after": 2,
        "steps": "surrogate",  # every round on the failing surrogate, as before the monitor
    }
    r = bs.train(
        OPAQUE,
        task="iris",
        method="blackbox",
        budget=120,
        out=tmp_path / "a",
        config=cfg,
        progress=False,
    )
    assert (
        r["extra"]["rounds"] - r["extra"]["accepted_rounds"] >= 2 and r["extra"]["refreshes"] >= 1
    )
    assert len(fits) == 1 + r["extra"]["refreshes"]  # the initial fit, then one per refresh
    assert all(n <= fits[0] for n in fits[1:])  # on the refit window, not all data
    fits.clear()
    r = bs.train(
        OPAQUE,
        task="iris",
        method="blackbox",
        budget=120,
        out=tmp_path / "b",
        config={**cfg, "refresh_after": 0},
        progress=False,
    )
    assert r["extra"]["refreshes"] == 0 and len(fits) == 1


def test_where_the_harmonic_law_holds_blackbox_sat_is_the_harmonic_method_run():
    """The law test is the harmonic run's own first chunk, so ``blackbox-sat`` on an
    all-periodic device gets ``--method harmonic``'s configuration, settings, minibatches and
    device noise: the same theta, not a run shifted by a separate test."""
    runs = {}
    for method in ("harmonic", "blackbox-sat"):  # 320: the budget rule lets a surrogate pay
        ctx = make_ctx(mzi(seed=0, n_modes=6), task="iris", budget=320, method=method)
        runs[method] = (get_method(method).fn(ctx), ctx.device.settings_used)
    (h, h_used), (b, b_used) = runs["harmonic"], runs["blackbox-sat"]
    np.testing.assert_array_equal(b.theta, h.theta)
    assert b_used == h_used and b.extra["checks"] == h.extra["checks"]
    assert b.extra["harmonic_law"]["holds"] is True and b.extra["surrogate"] is None
    spent = b.extra["budget_by_step"]
    assert 0 < spent["law_test"] < 60 and spent["law_test"] + spent["harmonic_steps"] == b_used - 1


def test_where_the_harmonic_law_fails_the_pipeline_runs_from_theta0(monkeypatch):
    """A failed law test abandons the harmonic run after its first checked chunk; the
    pipeline gets the budget left and the rough coordinates found."""
    real = blackbox_methods.harmonic_run

    def failing(ctx, options=None, holds=None):
        def rough(state):  # as if coordinate 0 fitted no harmonic order
            state.rough.add(0)
            return holds(state)

        return real(ctx, options, rough if holds else None)

    monkeypatch.setattr(blackbox_methods, "harmonic_run", failing)
    ctx = make_ctx(mzi(seed=0, n_modes=6), task="iris", budget=320, method="blackbox", config=SMALL)
    r = get_method("blackbox").fn(ctx)
    spent = r.extra["budget_by_step"]
    assert r.extra["harmonic_law"] == {"holds": False, "rough": [0]}
    assert 0 < spent["law_test"] < 60 and spent["init_design"] > 0
    assert sum(spent.values()) == ctx.device.settings_used - 1 <= 319  # 1: the gain calibration


def test_a_periodic_device_gets_spsa_below_two_harmonic_sweeps(tmp_path):
    from blackbox_sat.methods.blackbox import harmonic_pays

    n = 12  # mzi with 4 modes: 12 phases, two sweeps = 48 settings
    assert not harmonic_pays(47, n) and harmonic_pays(48, n)
    small, large = (
        bs.train("mzi", task="iris", method="blackbox-sat", budget=b, seed=0,
                 out=tmp_path / str(b), device_kw={"n_modes": 4}, progress=False)
        for b in (40, 60)
    )  # fmt: skip
    assert small["extra"]["without_surrogate"] == "spsa"
    assert "harmonic_law" in large["extra"] and "without_surrogate" not in large["extra"]
