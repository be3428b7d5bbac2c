"""The pipeline's parts on their own: the trust region, the device objectives, surrogate
selection's held-out score, the one projection rule, and ``pat``'s loop."""

import numpy as np
import pytest
import torch

from blackbox_sat.devices.contract import describe
from blackbox_sat.training.objectives import DeviceObjective, check_loss, check_minibatch
from blackbox_sat.training.pipeline import run_pat
from blackbox_sat.training.surrogate_choice import heldout_scores
from blackbox_sat.training.trust_region import TrustRegion
from surrogates.design import trust_region, wrap

from .conftest import make_ctx, small_mrr


def region(**kw) -> TrustRegion:
    return TrustRegion(
        **{"radius": 0.1, "radius_min": 0.025, "radius_max": 0.2, "grow": 2.0, "shrink": 0.5, **kw}
    )


def test_the_tolerance_is_the_measured_spread_of_the_check_loss():
    r = region()
    r.calibrate([1.0, 1.2, 1.4])
    assert r.check_loss == pytest.approx(1.2) and r.tol == pytest.approx(0.2)
    r.calibrate([1.0, 1.2, 1.4], accept_tol=0.05)
    assert r.tol == 0.05


def test_a_move_within_the_tolerance_is_accepted_and_grows_the_region():
    r = region()
    r.calibrate([1.0, 1.2, 1.4])
    assert r.judge(1.35)  # worse, but by less than the spread
    assert r.check_loss == 1.35 and r.radius == pytest.approx(0.2) and r.accepted == 1
    assert r.judge(1.0) and r.radius == pytest.approx(0.2)  # capped at radius_max


def test_a_worse_move_is_rejected_and_shrinks_the_region_to_its_floor():
    r = region()
    r.calibrate([1.0, 1.0], accept_tol=0.0)
    for expected in (0.05, 0.025, 0.025):
        assert not r.judge(1.01)
        assert r.radius == pytest.approx(expected) and r.check_loss == 1.0
    assert r.rejected_run == 3
    r.judge(0.9)
    assert r.rejected_run == 0


def test_the_box_is_centred_with_the_current_radius():
    lo, hi = region().box(np.array([0.3, -1.0]))
    np.testing.assert_allclose(lo, [0.2, -1.1])
    np.testing.assert_allclose(hi, [0.4, -0.9])


def test_wrapped_values_stay_below_high_even_when_rounding_lands_on_it():
    low, high = np.zeros(2), np.full(2, 2 * np.pi)
    theta = np.array([-1e-17, 7.0])  # np.mod(-1e-17, 2 pi) rounds to 2 pi exactly
    out = wrap(theta, low, high, np.array([True, False]))
    assert out[0] == 0.0 and out[1] == 2 * np.pi  # wrapped to low; the other clipped
    pts = trust_region(np.full(2, 2 * np.pi - 1e-12), 0.3, 256, low, high, periodic=True, rng=0)
    assert np.all(pts < high) and np.all(pts >= low)


def test_device_projection_is_the_design_rule():
    dev = small_mrr()
    info = describe(dev)
    rng = np.random.default_rng(0)
    theta = rng.uniform(-3, 3, (5, info.n_params)) * info.scale
    for t in theta:
        np.testing.assert_array_equal(info.project(t), wrap(t, info.low, info.high, info.periodic))


def test_check_loss_is_one_setting_on_a_fixed_minibatch():
    ctx = make_ctx(small_mrr(noise=0.0, programming_noise=0.0, dac_bits=None), budget=50)
    idx = check_minibatch(ctx)
    np.testing.assert_array_equal(idx, check_minibatch(ctx))  # fixed per seed
    assert len(np.unique(idx)) == len(idx)
    used = ctx.device.settings_used
    loss = check_loss(ctx, ctx.theta0, idx)
    assert ctx.device.settings_used == used + 1
    assert loss == pytest.approx(DeviceObjective(ctx).loss(ctx.theta0, idx), rel=1e-12)


class _Model:
    """A stand-in surrogate: ``y = x w + theta v`` (or without the ``theta`` term)."""

    def __init__(self, w, v):
        self.w, self.v = torch.as_tensor(w), torch.as_tensor(v)

    def predict(self, theta, x):
        return x.double() @ self.w + theta.double() @ self.v


def test_the_held_out_score_sees_only_what_theta_changes():
    rng = np.random.default_rng(0)
    w, v = rng.normal(size=(3, 2)), 0.1 * rng.normal(size=(4, 2))
    x = np.repeat(rng.normal(size=(25, 3)), 2, axis=0)  # each input at 2 settings
    theta = rng.normal(size=(50, 4))
    y = x @ w + theta @ v
    exact = heldout_scores(_Model(w, v), theta, x, y)
    blind = heldout_scores(_Model(w, np.zeros_like(v)), theta, x, y)
    assert exact["r2"] == pytest.approx(1) and exact["delta_r2"] == pytest.approx(1)
    assert blind["r2"] > 0.8 and abs(blind["delta_r2"]) < 1e-9  # good on y, blind to theta


def test_pat_spends_the_budget_on_steps_after_one_fit():
    ctx = make_ctx(
        small_mrr(),
        budget=60,
        method="pat",
        config={
            "surrogate": "hyper",
            "surrogate.hyper.n_members": 2,
            "surrogate.hyper.max_steps": 100,
        },
    )
    theta, extra = run_pat(ctx, ctx.config)
    assert ctx.device.remaining == 0
    init = int(ctx.config.init_fraction * ctx.budget)
    assert extra["steps"] == ctx.budget - 1 - init  # one setting went to the readout gain
    assert "round_log" not in extra and theta.shape == ctx.theta0.shape


def test_a_design_share_beyond_the_box_is_walked_by_spsa_and_the_box_follows():
    """Budget 400 on a 12-parameter device: 80 design settings, 30 in the box (2.5 per
    parameter), 50 walked by SPSA first; the box is centred where the walk ends, which
    trains (lower device loss than ``theta0``), and only the box is surrogate data."""
    from blackbox_sat.training.initial_design import design_split
    from blackbox_sat.training.pipeline import Timer, initial_fit

    from .toy_devices import opaque

    cfg = {"surrogate": "hyper", "surrogate_kw": {"hyper": {"n_members": 2, "max_steps": 100}}}
    ctx = make_ctx(opaque(seed=0), task="iris", budget=400, method="blackbox-sat", config=cfg)
    assert design_split(ctx.config, 400, 12) == (50, 30)
    assert design_split(ctx.config, 400, 160) == (0, 80)  # a box of the whole share
    used = ctx.device.settings_used
    data, _, _, theta = initial_fit(ctx, ctx.config, Timer())
    assert ctx.device.settings_used - used == 80 and len(data.theta) == 30
    u = np.array([t[0] for t in data.theta]) / ctx.info.scale
    assert np.abs(u - theta / ctx.info.scale).max() <= ctx.config.radius + 1e-9
    assert np.abs((theta - ctx.theta0) / ctx.info.scale).max() > ctx.config.radius  # it moved
    idx = check_minibatch(ctx)
    assert check_loss(ctx, theta, idx) < check_loss(ctx, ctx.theta0, idx) - 0.05
