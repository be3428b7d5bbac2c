"""Physics-aware steps and the device-anchored extra steps between them."""

import numpy as np
import torch

from blackbox_sat.sim import mrr
from blackbox_sat.training.physics_aware import Anchors, physics_aware_step

from .conftest import make_ctx


def _ctx():
    return make_ctx(mrr(seed=3, in_dim=4, out_dim=3), budget=50)


def test_anchored_gradient_at_the_anchor_is_the_physics_aware_gradient():
    # At the setting where rows were measured, the anchored outputs are the measured ones,
    # so the anchored gradient must be the physics-aware vector-Jacobian product exactly,
    # even though the stand-in (the nominal model) is biased against this chip.
    ctx = _ctx()
    model = ctx.source.nominal_model()
    idx = np.arange(32)
    step = physics_aware_step(ctx, ctx.theta0, idx, model)
    anchors = Anchors(len(ctx.y_train), ctx.info.out_dim)
    anchors.record(step, idx, ctx.theta0)
    g = anchors.step_gradient(ctx, model, ctx.theta0, idx)
    np.testing.assert_allclose(g, step.grad, rtol=2e-4, atol=1e-6 * np.abs(step.grad).max())
    with torch.no_grad():  # and the stand-in alone is indeed off: the anchor is what fixes it
        x = ctx.pnn.device_inputs(ctx.f_train[idx]).float()
        bias = np.abs(
            model(torch.as_tensor(ctx.theta0, dtype=torch.float32), x).double().numpy() - step.y
        ).max()
    assert bias > 0.05


def test_anchored_steps_need_measured_rows_and_survive_a_refit():
    ctx = _ctx()
    model = ctx.source.nominal_model()
    anchors = Anchors(len(ctx.y_train), ctx.info.out_dim)
    assert (
        anchors.step_gradient(ctx, model, ctx.theta0, np.arange(8)) is None
    )  # nothing measured yet
    idx = np.arange(16)
    step = physics_aware_step(ctx, ctx.theta0, idx, model)
    anchors.record(step, idx, ctx.theta0)
    # A different stand-in (a "refit"): residuals are recomputed, and the anchored outputs at
    # the anchor are still the measurement, so the gradient is still the physics-aware one.
    other = ctx.source.true_model()
    anchors.invalidate()
    g = anchors.step_gradient(
        ctx, lambda th, x: other(th.double(), x.double()).float(), ctx.theta0, np.arange(64)
    )  # rows 16.. are unmeasured and left out
    ref = physics_aware_step(
        ctx, ctx.theta0, idx, lambda th, x: other(th.double(), x.double()).float()
    )
    assert np.corrcoef(g, ref.grad)[0, 1] > 0.99


def test_paired_delta_r2_scores_only_what_theta_changes():
    from blackbox_sat.training.surrogate_choice import paired_delta_r2

    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(50, 3)), 4, axis=0)  # each input under 4 settings
    theta_part = rng.normal(size=(200, 2))
    y = np.c_[x[:, :1], x[:, 1:2]] * 3 + theta_part  # mostly x-driven
    blind = np.c_[x[:, :1], x[:, 1:2]] * 3  # perfect on x, ignores theta
    assert abs(paired_delta_r2(blind, y, x)) < 0.05  # yet a plain R² would be high
    assert paired_delta_r2(y + 0.1 * rng.normal(size=y.shape), y, x) > 0.95
    assert np.isnan(paired_delta_r2(y, y, rng.normal(size=(200, 3))))  # no repeated input
