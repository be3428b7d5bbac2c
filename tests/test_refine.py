"""Zeroth-order refinement (blackbox_sat.training.refine): it lowers the device loss on a noisy
device, never spends more than it is given, blocking rejects a move that raises the loss,
sa-spsa perturbs at exactly rho, gain calibration hits its target step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blackbox_sat.harness.run import train
from blackbox_sat.sim.mzi import mzi
from blackbox_sat.training.config import ConfigError
from blackbox_sat.training.objectives import DeviceObjective
from blackbox_sat.training.refine import (
    RULES,
    RefineConfig,
    refine,
    refine_options,
)

from .conftest import fail_after, make_ctx, record_refine_queries, small_mrr, true_loss

# tiny tensors: one thread is much faster, and the test machine's cores are shared
torch.set_num_threads(1)


def test_objective_counts_one_setting_per_loss_and_matches_true_model():
    ctx = make_ctx(small_mrr(noise=0.0, programming_noise=0.0, dac_bits=None))
    obj = DeviceObjective(ctx)
    idx = np.arange(40)
    used = ctx.device.settings_used
    loss = obj.loss(ctx.theta0, idx)
    assert ctx.device.settings_used == used + 1
    model = ctx.source.true_model()
    with torch.no_grad():
        y = model(torch.as_tensor(ctx.theta0), ctx.pnn.device_inputs(ctx.f_train[idx]))
        want = float(F.cross_entropy(ctx.pnn(y), torch.as_tensor(ctx.y_train[idx])))
    assert loss == pytest.approx(want, rel=1e-9)
    two = obj.losses([ctx.theta0, ctx.theta0], idx)
    assert ctx.device.settings_used == used + 3 and two == pytest.approx([want, want])
    np.testing.assert_allclose(obj.to_theta(obj.to_u(ctx.theta0)), ctx.theta0)
    with pytest.raises(ValueError):
        obj.loss(ctx.theta0, np.arange(129) % 84)


def test_objective_wraps_periodic_parameters():
    ctx = make_ctx(mzi(n_modes=4, seed=0))
    obj = DeviceObjective(ctx)
    u = obj.to_u(ctx.theta0) + 1.25  # past the period on every coordinate
    theta = obj.to_theta(u)
    np.testing.assert_allclose(theta, ctx.info.project(ctx.theta0 + 1.25 * ctx.info.scale))
    assert np.all((theta >= ctx.info.low) & (theta < ctx.info.high))
    np.testing.assert_array_equal(obj.keep(u), u)  # periodic iterates stay unwrapped


def test_options_are_checked():
    assert refine_options("rdsa").direction_kind == "gaussian"
    assert refine_options("spsa").direction_kind == "rademacher"
    with pytest.raises(ConfigError, match="did you mean|valid keys"):
        refine_options("spsa", nonsense=1)
    with pytest.raises(ValueError):
        refine_options("newton")
    with pytest.raises(ValueError):
        refine_options("spsa", select="test")


# --- the behavioural claim: refinement lowers the measured device loss ------------------
@pytest.mark.parametrize(
    "rule,extra",
    [
        ("spsa", {}),
        ("rdsa", {"resamples": 2}),
        ("sa-spsa", {"rho": 0.1}),
        ("spsa", {"normalize": None}),
    ],
)
def test_refinement_lowers_device_loss_on_noisy_device(rule, extra):
    ctx = make_ctx(small_mrr(), budget=500)
    before = true_loss(ctx, ctx.theta0)
    # and as measured on the (noisy) device, over fixed minibatches, with repeats
    obj = DeviceObjective(ctx, purpose="eval")
    batches = [np.arange(i, i + 28) for i in (0, 28, 56)]
    measured_before = np.mean([obj.loss(ctx.theta0, b) for b in batches for _ in range(3)])
    theta, history = refine(ctx, ctx.theta0, 450, rule=rule, **extra)
    after = true_loss(ctx, theta)
    measured_after = np.mean([obj.loss(theta, b) for b in batches for _ in range(3)])
    assert history.summary["steps"] > 50
    assert after < 0.5 * before, (before, after)
    assert measured_after < 0.5 * measured_before, (measured_before, measured_after)


# --- budget -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"blocking": True},
        {"resamples": 3},
        {"select": "val"},
        {"normalize": None, "select": "val"},
        {"calibration": 7, "blocking": True, "resamples": 2},
    ],
)
@pytest.mark.parametrize("rule", RULES)
def test_refine_never_spends_more_than_given(rule, opts):
    ctx = make_ctx(small_mrr(), budget=1000)
    start = ctx.device.settings_used
    for n in (0, 3, 9, 61):
        used0 = ctx.device.settings_used
        theta, history = refine(ctx, ctx.theta0, n, rule=rule, **opts)
        spent = ctx.device.settings_used - used0
        assert spent <= n
        assert history.summary["settings_used"] == ctx.device.settings_used
        assert all("loss" in h and "settings_used" in h for h in history)
        assert np.all((theta >= ctx.info.low) & (theta <= ctx.info.high))
    assert ctx.device.settings_used - start > 0


class _SmallBatches:
    """A contract device that measures at most 30 inputs per setting (delegates to mrr)."""

    max_batch = 30

    def __init__(self):
        self._dev = small_mrr()
        for name in ("n_params", "in_dim", "out_dim", "bounds", "input_bounds", "theta0"):
            setattr(self, name, getattr(self._dev, name))

    def query(self, theta, x):
        return self._dev.query(theta, x)


def test_refine_plans_with_the_cost_of_split_batches():
    ctx = make_ctx(_SmallBatches(), budget=400)
    obj = DeviceObjective(ctx)
    assert obj.cost(84) == 3
    left = ctx.device.remaining
    _theta, history = refine(ctx, ctx.theta0, 10_000, rule="spsa", blocking=True, select="val")
    assert ctx.device.settings_used <= ctx.budget
    assert history.summary["steps"] >= 1 and ctx.device.remaining < left


def test_refine_stops_gracefully_when_the_device_budget_runs_out():
    ctx = make_ctx(small_mrr(), budget=200)
    _theta, history = refine(ctx, ctx.theta0, 10_000)  # more than the device has left
    assert ctx.device.settings_used <= 200
    assert history.summary["steps"] > 0


def test_refine_survives_budget_exhausted_from_the_device(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=300)
    fail_after(ctx, monkeypatch, 40)
    theta, history = refine(ctx, ctx.theta0, 200)
    assert history.summary.get("budget_exhausted") is True
    assert np.all(np.isfinite(theta))


@pytest.mark.parametrize("rule", RULES)
def test_train_through_registry_respects_budget_for_every_rule(rule, tmp_path):
    result = train(
        small_mrr(),
        task="iris",
        method="spsa",
        budget=120,
        seed=0,
        out=tmp_path / rule,
        config={"rule": rule, "blocking": rule == "rdsa"},
        progress=False,
    )
    assert result["settings_used"] <= 120
    assert result["extra"]["refine"]["steps"] > 10
    assert [c["settings"] for c in result["curve"]][:6] == [0, 12, 15, 24, 30, 60]  # 0: theta0


# --- blocking -------------------------------------------------------------------------
def _quadratic_objective(monkeypatch, target_u):
    """Replace the measured loss by ||u - target||^2 (deterministic); each call still
    programs one setting on the device, so it is counted as usual."""
    real = DeviceObjective.loss

    def fake(self, theta, idx, purpose=None):
        real(self, theta, idx, purpose)
        return float(np.sum((self.to_u(theta) - target_u) ** 2))

    monkeypatch.setattr(DeviceObjective, "loss", fake)


def test_blocking_rejects_moves_that_raise_the_loss(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=400)
    u0 = ctx.theta0 / ctx.info.scale
    target = u0 + 0.05
    _quadratic_objective(monkeypatch, target)
    loss = lambda th: float(np.sum((th / ctx.info.scale - target) ** 2))  # noqa: E731
    # a = 50 overshoots far past the minimum: a move (unless the estimate is exactly 0)
    # lands near a corner of the box, where the loss is much higher
    kw = dict(a=50.0, normalize=None, select="last", average=0.0)
    used = ctx.device.settings_used
    theta_b, hist_b = refine(ctx, ctx.theta0, 60, blocking=True, **kw)
    steps = list(hist_b)
    assert len(steps) == 20 and ctx.device.settings_used - used == 60  # 3 settings per step
    for h in steps:
        assert h["accepted"] == (h["new_loss"] <= h["loss"])
    assert hist_b.summary["rejected"] >= 15
    assert loss(theta_b) <= loss(ctx.theta0) + 1e-12
    # the same run without blocking moves and ends with a far higher loss: the test can fail
    theta_n, _ = refine(ctx, ctx.theta0, 60, blocking=False, **kw)
    assert loss(theta_n) > 10 * loss(ctx.theta0)


def test_blocking_accepts_moves_that_lower_the_loss(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=400)
    u0 = ctx.theta0 / ctx.info.scale
    _quadratic_objective(monkeypatch, np.clip(u0 + 0.2, 0, 1))
    theta, hist = refine(
        ctx, ctx.theta0, 150, blocking=True, normalize=None, step=0.02, select="last", average=0.0
    )
    assert hist.summary["rejected"] < hist.summary["steps"] / 2
    assert np.sum((theta / ctx.info.scale - np.clip(u0 + 0.2, 0, 1)) ** 2) < 0.9 * np.sum(
        (u0 - np.clip(u0 + 0.2, 0, 1)) ** 2
    )


# --- sharpness-aware ZO ---------------------------------------------------------------
@pytest.mark.parametrize("sa", ["random", "ascent"])
def test_sa_spsa_perturbs_at_radius_rho(sa, monkeypatch):
    ctx = make_ctx(small_mrr(), budget=400)
    info = ctx.info
    queried = record_refine_queries(ctx, monkeypatch)
    rho, c = 0.3, 0.02
    # a = 0: the iterate stays at theta0, so every pair is centred at u0 + xi
    _theta, hist = refine(
        ctx, ctx.theta0, 60, rule="sa-spsa", rho=rho, c=c, a=0.0, sa=sa, select="last"
    )
    u0 = ctx.theta0 / info.scale
    pairs = np.asarray(queried).reshape(-1, 2, info.n_params) / info.scale
    xi = pairs.mean(axis=1) - u0
    half = (pairs[:, 0] - pairs[:, 1]) / 2
    assert len(xi) == 30
    assert np.all((pairs > 0) & (pairs < 1))  # nothing clipped, so the queries show xi exactly
    np.testing.assert_allclose(np.linalg.norm(xi, axis=1), rho, rtol=1e-9)
    # the SPSA half-difference is c_k * d with |d_i| = 1 (Rademacher), c_k = c / (k + 1)^gamma
    ck = np.abs(half).mean(axis=1)
    np.testing.assert_allclose(np.abs(half), ck[:, None] * np.ones((1, info.n_params)), rtol=1e-9)
    assert np.all(ck <= c + 1e-12) and np.all(ck > 0.5 * c)
    assert all(h["xi_norm"] == pytest.approx(rho) for h in hist)
    # perturbations differ between steps (random), or follow the running gradient (ascent)
    cos = (xi[1:] * xi[:-1]).sum(1) / rho**2
    if sa == "random":
        assert np.max(np.abs(cos)) < 0.9
    else:
        assert np.median(cos) > 0.5


def test_plain_spsa_pairs_are_centred_on_the_iterate(monkeypatch):
    ctx = make_ctx(small_mrr(), budget=100)
    queried = record_refine_queries(ctx, monkeypatch)
    refine(ctx, ctx.theta0, 20, rule="spsa", a=0.0, rho=0.3)
    pairs = np.asarray(queried).reshape(-1, 2, ctx.info.n_params)
    np.testing.assert_allclose(pairs.mean(axis=1), np.tile(ctx.theta0, (len(pairs), 1)), atol=1e-12)


# --- gain calibration -----------------------------------------------------------------
@pytest.mark.parametrize("target", [0.005, 0.02])
def test_gain_calibration_sets_the_first_step_size(target, monkeypatch):
    ctx = make_ctx(small_mrr(), budget=600)
    # a linear loss w.u has the same gradient everywhere, so the calibrated gain must give
    # steps of the target size all along (after undoing the a_k decay)
    w = np.random.default_rng(5).standard_normal(ctx.info.n_params)
    w /= np.linalg.norm(w)
    real = DeviceObjective.loss

    def linear(self, theta, idx, purpose=None):
        real(self, theta, idx, purpose)
        return float(w @ self.to_u(theta))

    monkeypatch.setattr(DeviceObjective, "loss", linear)
    _theta, hist = refine(ctx, ctx.theta0, 500, step=target, normalize=None, select="last")
    steps, summary = list(hist), hist.summary
    alpha, big_a = RefineConfig().alpha, 0.1 * summary["planned_steps"]
    # a_0 * calibrated RMS is the target exactly ...
    assert summary["a"] / (1 + big_a) ** alpha * summary["calibration_rms"] == pytest.approx(target)
    assert summary["calibration_rms"] == pytest.approx(1.0, rel=0.6)  # RMS of (w.d) d is |w| = 1
    # ... and the steps really move about that much (RMS per coordinate, normalized): the
    # mean of |w.d| over directions is 0.8 |w|, so the steps average ~0.8 x target
    sizes = [h["step_rms"] * ((h["step"] + 1 + big_a) / (1 + big_a)) ** alpha for h in steps[:40]]
    assert target * 0.5 < np.mean(sizes) < target * 1.2


def test_adam_normalised_first_step_is_exactly_step_per_coordinate():
    ctx = make_ctx(small_mrr(), budget=200)
    used = ctx.device.settings_used
    _theta, hist = refine(ctx, ctx.theta0, 40, step=0.004, select="last")  # adam is the default
    assert ctx.device.settings_used - used == 40  # no calibration settings with adam
    assert hist[0]["step_rms"] == pytest.approx(0.004, rel=1e-9)
