"""Gradient-free baselines (blackbox_sat.methods.gradient_free): registration, budget,
one minibatch per generation, the CMA mean recommendation, periodic coordinates,
determinism, graceful stop, and spsa clearly above chance."""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np
import pytest
import torch

from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.harness.run import train
from blackbox_sat.methods import gradient_free as gf
from blackbox_sat.methods.registry import get_method
from blackbox_sat.sim.mrr import mrr
from blackbox_sat.sim.mzi import mzi
from blackbox_sat.training.objectives import DeviceObjective

from .conftest import fail_after, make_ctx, small_mrr

torch.set_num_threads(1)  # tiny tensors; the test machine's cores are shared

NG = ("ng-cma", "ng-ngopt", "ng-tbpsa")


def test_registered_as_device_methods_with_data_defaults():
    for name in ("spsa", *NG):
        spec = get_method(name)
        assert spec.needs == "device" and not spec.model_based and spec.summary
    assert get_method("spsa").defaults["rule"] == "spsa"
    assert get_method("spsa").defaults["select"] == "val"
    assert set(asdict(gf.NevergradConfig())) <= set(get_method("ng-cma").defaults)


@pytest.mark.parametrize("method", NG)
def test_ng_methods_train_within_budget_and_report(method, tmp_path):
    budget = 90
    result = train(
        small_mrr(), task="iris", method=method, budget=budget, seed=0, out=tmp_path, progress=False
    )
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.counts()["settings"] == result["settings_used"] <= budget
    ledger.close()
    extra = result["extra"]
    assert extra["evaluations"] == budget - 1  # all but the gain-calibration setting
    assert extra["generations"] >= (2 if method == "ng-tbpsa" else 5)  # TBPSA: lambda = 4 mu = 56
    assert [c["settings"] for c in result["curve"]] == [0, 9, 11, 18, 22, 45, 90]  # 0: theta0
    if method == "ng-ngopt":
        assert (
            "NGOpt" not in extra["optimizer"] and len(extra["optimizer"]) > 3
        )  # the optimizer it chose
        assert extra["recommendation"] == "nevergrad pessimistic best"
    else:
        assert extra["recommendation"] == "mean"
        assert ("elitist=False" in extra["optimizer"]) == (method == "ng-cma")


def _record_queries(monkeypatch, ctx):
    log = []
    real = ctx.device.query

    def record(theta, x, purpose="train"):
        log.append((purpose, np.asarray(theta, float).copy(), np.asarray(x, float).copy()))
        return real(theta, x, purpose=purpose)

    monkeypatch.setattr(ctx.device, "query", record)
    return log


def _capture_optimizer(monkeypatch):
    box = {}
    real = gf._make_optimizer

    def make(kind, space, budget, popsize, sigma0):
        box["opt"], box["space"] = real(kind, space, budget, popsize, sigma0), space
        return box["opt"]

    monkeypatch.setattr(gf, "_make_optimizer", make)
    return box


def test_ng_cma_one_minibatch_per_generation_and_mean_recommendation(monkeypatch):
    ctx = make_ctx(mrr(in_dim=4, out_dim=10, seed=0), task="digits", budget=200, method="ng-cma")
    log = _record_queries(monkeypatch, ctx)
    box = _capture_optimizer(monkeypatch)
    out = gf.run_nevergrad(ctx, "cma")
    train_q = [q for q in log if q[0] == "train"]
    pop = out.extra["popsize"]
    assert pop == gf.default_popsize(ctx.info.n_params) == 15  # 4 + floor(3 ln 40)
    assert len(train_q) == 199 and out.extra["generations"] == -(-199 // pop)
    # every generation measures all its candidates on the same 128 inputs; the next uses new ones
    gens = [train_q[i : i + pop] for i in range(0, len(train_q), pop)]
    for g in gens:
        assert all(np.array_equal(q[2], g[0][2]) for q in g) and len(g[0][2]) == 128
    assert all(not np.array_equal(a[0][2], b[0][2]) for a, b in itertools.pairwise(gens))
    # the returned setting is the CMA distribution mean, not the best single noisy evaluation
    opt, space = box["opt"], box["space"]
    obj = DeviceObjective(ctx)
    mean_theta = obj.to_theta(space.from_standardized(opt.es.mean))
    np.testing.assert_allclose(out.theta, mean_theta)
    best_theta = obj.to_theta(space.to_u(opt.provide_recommendation().value))
    assert not np.allclose(out.theta, best_theta)
    # non-elitist, full covariance, initial step sigma0 in normalized units
    assert opt.es.opts["CMA_elitist"] is False and not opt.es.opts["CMA_diagonal"]
    assert (
        0.2 * gf.NevergradConfig().sigma0
        < out.extra["final_sigma"]
        < 5 * gf.NevergradConfig().sigma0
    )


def test_ng_tbpsa_recommends_its_centre(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=200, method="ng-cma")
    box = _capture_optimizer(monkeypatch)
    out = gf.run_nevergrad(ctx, "tbpsa")
    opt, space = box["opt"], box["space"]
    centre = DeviceObjective(ctx).to_theta(space.from_standardized(opt.current_center))
    np.testing.assert_allclose(out.theta, centre)
    assert out.extra["generations"] >= 2 and np.any(opt.current_center != 0)  # it moved


def test_cma_initial_spread_is_sigma0_in_normalized_units(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=60, config={"sigma0": 0.03}, method="ng-cma")
    log = _record_queries(monkeypatch, ctx)
    gf.run_nevergrad(ctx, "cma")
    u0 = ctx.theta0 / ctx.info.scale
    first = np.asarray([q[1] for q in log if q[0] == "train"][:14]) / ctx.info.scale
    spread = np.std(first - u0)
    assert 0.02 < spread < 0.04


def test_periodic_coordinates_are_free_and_wrapped(tmp_path):
    dev = mzi(n_modes=4, seed=0)  # all 12 phases periodic
    result = train(
        dev,
        task="iris",
        method="ng-cma",
        budget=60,
        seed=0,
        out=tmp_path,
        progress=False,
        config={"sigma0": 0.3},
    )
    assert result["settings_used"] <= 60
    ctx = make_ctx(dev, budget=10)
    obj = DeviceObjective(ctx)
    u0 = obj.to_u(ctx.theta0)
    space = gf._Space(obj, u0, 0.3)
    assert not space.bounded.any()
    np.testing.assert_allclose(space.from_standardized(np.zeros(12)), u0)
    far = space.from_standardized(np.full(12, 10.0))  # 3 periods away: not bounced, wrapped later
    np.testing.assert_allclose(far, u0 + 3.0)
    np.testing.assert_allclose(
        obj.to_theta(far), ctx.info.project(ctx.theta0 + 3.0 * ctx.info.scale)
    )


class _Mixed:
    """A toy contract device: 3 clipped parameters in [0, 2], 3 periodic phases, 1 free."""

    n_params, in_dim, out_dim = 7, 4, 3
    bounds = (
        np.array([0, 0, 0, 0, 0, 0, -np.inf]),
        np.array([2, 2, 2, 2 * np.pi, 2 * np.pi, 2 * np.pi, np.inf]),
    )
    periodic = np.array([False, False, False, True, True, True, False])
    theta0 = np.array([1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 0.0])

    def query(self, theta, x):
        w = np.stack(
            [np.cos(theta[3:6]) * theta[:3], np.sin(theta[3:6]), np.tanh(theta[:3] - 1 + theta[6])]
        )
        return x[:, :3] @ w + 0.001


def test_mixed_space_round_trip_and_training(tmp_path):
    ctx = make_ctx(_Mixed(), budget=10)
    obj = DeviceObjective(ctx)
    u0 = obj.to_u(ctx.theta0)
    space = gf._Space(obj, u0, 0.1)
    np.testing.assert_array_equal(space.bounded, [True] * 3 + [False] * 4)
    np.testing.assert_allclose(space.from_standardized(np.zeros(7)), u0)
    big = space.from_standardized(np.full(7, 20.0))  # +2 normalized units everywhere
    assert np.all((big[:3] >= 0) & (big[:3] <= 1))  # bounded part bounced inside
    np.testing.assert_allclose(big[3:], u0[3:] + 2.0)  # periodic and free: untouched
    for method in (*NG, "spsa"):
        r = train(
            _Mixed(),
            task="iris",
            method=method,
            budget=50,
            seed=0,
            out=tmp_path / method,
            progress=False,
        )
        assert r["settings_used"] <= 50


def test_same_seed_same_result(tmp_path):
    thetas = [
        np.load(tmp_path / str(i) / "theta.npy")
        for i in range(2)
        if train(
            small_mrr(),
            task="iris",
            method="ng-ngopt",
            budget=50,
            seed=3,
            out=tmp_path / str(i),
            progress=False,
        )
    ]
    np.testing.assert_array_equal(*thetas)


def test_budget_exhausted_from_the_device_returns_the_mean(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=300, method="ng-cma")
    calls = fail_after(ctx, monkeypatch, 50)
    for kind in ("cma", "tbpsa", "ngopt"):
        calls["n"] = 0
        out = gf.run_nevergrad(ctx, kind)
        assert out.extra["budget_exhausted"] is True
        assert np.all(np.isfinite(out.theta)) and np.all(
            (out.theta >= 0) & (out.theta <= ctx.info.high)
        )


def test_spsa_on_mrr_is_clearly_above_chance(tmp_path):
    # a 4 x 3 weight bank (12 rings) with the default noise; iris has 3 classes
    result = train(
        mrr(seed=0, in_dim=4, out_dim=3),
        task="iris",
        method="spsa",
        budget=300,
        seed=0,
        out=tmp_path,
        progress=False,
    )
    assert result["settings_used"] <= 300
    assert (
        result["accuracy"] >= 0.55 and result["val_accuracy"] >= 0.55
    )  # chance is 1/3 (0.73 / 0.81 measured)
    assert result["extra"]["refine"]["chosen"] in ("average", "last")
    assert result["extra"]["refine"]["val_accuracy"]  # the choice was paid for on validation


@pytest.mark.parametrize("method", ["spsa", "ng-cma"])
def test_resume_replays_the_whole_run(method, tmp_path):
    """The methods are deterministic given the seed, so a resumed run replays every
    logged query from the ledger and ends at the same setting without paying again."""
    from blackbox_sat.harness.run import resume

    first = train(
        small_mrr(), task="iris", method=method, budget=60, seed=1, out=tmp_path, progress=False
    )
    theta = np.load(tmp_path / "theta.npy")
    (tmp_path / "result.json").unlink()
    again = resume(tmp_path, device=small_mrr(), progress=False)
    assert again["replayed_settings"] >= first["settings_used"]
    assert again["settings_used"] == first["settings_used"]
    np.testing.assert_array_equal(np.load(tmp_path / "theta.npy"), theta)
