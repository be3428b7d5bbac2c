"""Deep-ensemble surrogates: recovery of a known function, uncertainty, gradients, updates."""

import numpy as np
import pytest
import torch

from surrogates import EnsembleSurrogate, make_surrogate

P, IN, OUT = 6, 5, 3
_r = np.random.default_rng(123)
A0 = _r.normal(size=(OUT, IN))
AK = _r.normal(size=(P, OUT, IN)) * 0.8


def smooth_fn(theta, x):
    """``y = tanh(A(theta)) x`` with ``A`` smooth in ``theta``: linear in ``x``, weights a
    nonlinear function of ``theta`` (the microring-bank picture)."""
    a = A0 + np.einsum("np,poi->noi", np.sin(1.5 * theta), AK)
    return np.einsum("noi,ni->no", np.tanh(a), x)


def rows(n_settings, per_setting, rng, scale=1.0):
    theta = rng.uniform(-1, 1, (n_settings, P)) * scale
    x = rng.uniform(-1, 1, (n_settings, per_setting, IN))
    t = np.repeat(theta[:, None], per_setting, 1).reshape(-1, P)
    xr = x.reshape(-1, IN)
    return t, xr, smooth_fn(t, xr)


def heldout_r2(model, theta, x, y):
    """R^2 of ``y`` and of its ``theta``-dependent part ``y(theta, x) - y(0, x)``, on held-out
    settings. A model ignoring ``theta`` scores about 0 on the second."""
    with torch.no_grad():
        pred = model.predict(theta, x).double().numpy()
        pred0 = model.predict(np.zeros(P), x).double().numpy()
    y0 = smooth_fn(np.zeros_like(theta), x)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    d, dp = y - y0, pred - pred0
    return r2, 1 - ((dp - d) ** 2).sum() / ((d - d.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    theta, x, y = rows(200, 16, rng)
    y = y + 0.01 * rng.normal(size=y.shape)
    return (theta, x, y), rows(40, 16, rng)


# Thresholds sit below the measured values (seeds 0 and 1: hyper R^2 0.973-0.978, theta-part
# 0.958-0.964; mlp 0.983, 0.975-0.977) with margin for BLAS differences; a model that ignores
# theta scores ~0 on the theta-part. On this small, strongly nonlinear toy the plain MLP does
# as well: the hyper family's advantage is in gradients with many parameters.
@pytest.mark.parametrize(
    "kind, kw, r2_min, dr2_min",
    [
        ("hyper", {}, 0.95, 0.93),
        ("mlp", {"structure_kw": {"hidden": 128}}, 0.95, 0.9),
    ],
)
def test_recovers_known_smooth_function(data, kind, kw, r2_min, dr2_min):
    train, test = data
    model = make_surrogate(kind, max_steps=1000, lr=1e-2, seed=0, **kw).fit(*train)
    r2, dr2 = heldout_r2(model, *test)
    assert r2 > r2_min and dr2 > dr2_min, (kind, r2, dr2)


def test_ensemble_std_grows_away_from_the_data():
    rng = np.random.default_rng(1)
    theta, x, y = rows(100, 8, rng, scale=0.3)
    model = make_surrogate("hyper", max_steps=400, lr=1e-2, seed=1).fit(theta, x, y)
    xq = rng.uniform(-1, 1, (64, IN))
    _, std_near = model.predict_with_uncertainty(theta[:1], xq)
    _, std_far = model.predict_with_uncertainty(np.full(P, 3.0), xq)
    assert std_far.mean() > 3 * std_near.mean(), (std_near.mean(), std_far.mean())
    # 20 normalised units out in x too
    _, std_far_x = model.predict_with_uncertainty(theta[0], xq * 10)
    assert std_far_x.mean() > 3 * std_near.mean()


@pytest.mark.parametrize("kind", ["hyper", "hyper-additive", "mlp"])
def test_gradients_match_finite_differences(kind):
    rng = np.random.default_rng(2)
    theta, x, y = rows(30, 8, rng)
    model = make_surrogate(
        kind, max_steps=30, dtype="float64", periodic=[True] + [False] * (P - 1), seed=2
    ).fit(theta, x, y)
    th = torch.tensor(rng.uniform(-1, 1, P), requires_grad=True)
    xq = torch.tensor(rng.uniform(-1, 1, (7, IN)), requires_grad=True)
    w = torch.tensor(rng.normal(size=(7, OUT)))
    g_theta, g_x = torch.autograd.grad((model.predict(th, xq) * w).sum(), (th, xq))

    def f(t, xx):
        with torch.no_grad():
            return torch.tensor(float((model.predict(t, xx) * w).sum()), dtype=torch.float64)

    eps = 1e-6
    fd_theta = torch.stack(
        [
            (f(th + eps * e, xq) - f(th - eps * e, xq)) / (2 * eps)
            for e in torch.eye(P, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(g_theta, fd_theta, rtol=1e-5, atol=1e-7)
    e = torch.zeros_like(xq)
    e[3, 2] = eps
    torch.testing.assert_close(
        g_x[3, 2], (f(th, xq + e) - f(th, xq - e)) / (2 * eps), rtol=1e-5, atol=1e-7
    )


def test_float32_gradient_flows_to_a_float64_theta_and_per_row_theta():
    rng = np.random.default_rng(3)
    theta, x, y = rows(30, 8, rng)
    model = make_surrogate("hyper", max_steps=20, seed=3).fit(theta, x, y)
    th = torch.tensor(theta[0], requires_grad=True)  # float64, broadcast over rows
    out = model.predict(th, x[:10])
    assert out.dtype == torch.float32 and out.shape == (10, OUT)
    (g,) = torch.autograd.grad(out.sum(), th)
    assert g.dtype == torch.float64 and torch.all(torch.isfinite(g)) and g.abs().sum() > 0
    per_row = torch.tensor(np.repeat(theta[:1], 10, 0), requires_grad=True)
    (g_rows,) = torch.autograd.grad(model.predict(per_row, x[:10]).sum(), per_row)
    torch.testing.assert_close(g_rows.sum(0), g, rtol=1e-4, atol=1e-5)
    # predictions record no graph towards the weights: only theta's path is built
    assert all(not p.requires_grad for p in model.model.parameters())


def test_update_warm_starts_and_improves(data):
    (theta, x, y), test = data
    model = make_surrogate("hyper", max_steps=150, lr=1e-2, seed=4).fit(
        theta[:1600], x[:1600], y[:1600]
    )
    before = heldout_r2(model, *test)[0]
    norm_loc = model.theta_norm.loc.clone()
    model.update(theta[1600:], x[1600:], y[1600:], append=True, steps=300)
    assert len(model.data) == len(theta)
    assert model.last_report.steps == 300
    torch.testing.assert_close(model.theta_norm.loc, norm_loc)  # normalisation kept
    assert heldout_r2(model, *test)[0] > before
    model.update(theta[:800], x[:800], y[:800])  # replace; default 100 steps
    assert len(model.data) == 800 and model.last_report.steps == 100


def test_early_stopping_holds_out_settings_and_restores_best():
    rng = np.random.default_rng(5)
    theta, x, y = rows(40, 8, rng)
    y = y + 0.5 * rng.normal(size=y.shape)  # noisy: long training overfits
    model = EnsembleSurrogate("mlp", max_steps=4000, lr=1e-2, eval_every=20, patience=3, seed=5)
    model.fit(theta, x, y, groups=np.repeat(np.arange(40), 8))
    assert model.last_report.stopped_early and model.last_report.steps < 4000
    assert len(model.last_report.best_val_mse) == model.n_members


def test_validation_rows_come_grouped_from_each_members_held_out_settings():
    from surrogates.dataset import MemberSplit

    counts = np.array([3, 40, 40, 7, 40] * 8)  # uneven rows per setting
    groups = np.repeat(np.arange(len(counts)), counts)
    split = MemberSplit.by_settings(groups, 4, 0.25, 200, np.random.default_rng(0))
    m, s, k = split.val_idx.shape
    assert m == 4 and s * k <= 200 and k == 20  # min(median 40, 200 // 10 held out)
    vg = groups[split.val_idx.numpy()]
    assert (vg == vg[..., :1]).all()  # each row of a group: one setting
    for i in range(m):
        held = set(vg[i, :, 0].tolist())
        assert len(held) == s and not held & set(split.train_groups[i].tolist())
        for g_idx, g in enumerate(vg[i, :, 0]):  # distinct rows while the setting has them
            assert len(set(split.val_idx[i, g_idx].tolist())) == min(k, counts[g])


def test_members_differ_and_seed_reproduces():
    rng = np.random.default_rng(6)
    theta, x, y = rows(30, 8, rng)
    a = make_surrogate("hyper", max_steps=30, seed=7).fit(theta, x, y)
    b = make_surrogate("hyper", max_steps=30, seed=7).fit(theta, x, y)
    torch.testing.assert_close(
        a.predict(theta[:5], x[:5]), b.predict(theta[:5], x[:5]), rtol=0, atol=0
    )
    members = a.member_predictions(theta[:5], x[:5])
    assert members.shape == (5, 5, OUT) and members.std(0).min() > 0


def test_bad_shapes_are_reported():
    rng = np.random.default_rng(8)
    theta, x, y = rows(10, 4, rng)
    model = make_surrogate("mlp", max_steps=5).fit(theta, x, y)
    with pytest.raises(ValueError, match="theta"):
        model.predict(np.zeros(P + 1), x[:3])
    with pytest.raises(ValueError, match="x must"):
        model.predict(np.zeros(P), np.zeros((3, IN + 1)))
    with pytest.raises(ValueError, match="n_params"):
        model.update(theta[:, :-1], x, y)
    with pytest.raises(ValueError, match="same number"):
        make_surrogate("mlp").fit(theta, x[:-1], y)
    with pytest.raises(RuntimeError, match="not fitted"):
        make_surrogate("hyper").predict(np.zeros(P), x)


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("hyper", {}),
        ("hyper", {"structure_kw": {"quadratic": True}}),
        ("hyper-additive", {}),
        ("mlp", {}),
    ],
)
def test_recentre_moves_the_theta_origin_without_changing_predictions(kind, kw):
    rng = np.random.default_rng(9)
    theta, x, y = rows(30, 8, rng, scale=0.2)
    periodic = [False, True] + [False] * (P - 2)
    model = make_surrogate(kind, max_steps=30, dtype="float64", periodic=periodic, seed=9, **kw)
    model.fit(theta, x, y)
    query = rng.uniform(-1, 1, (12, P))
    before = model.predict(query, x[:12])
    stored_theta = model.theta_norm.inverse(model.data.theta)
    model.recentre(np.full(P, 0.7))
    torch.testing.assert_close(model.predict(query, x[:12]), before, rtol=1e-10, atol=1e-10)
    # the origin of the non-periodic columns moved; the periodic column's angle frame did not
    np.testing.assert_allclose(model.theta_norm.loc.numpy()[[0, 2]], 0.7)
    assert model.theta_norm.loc[1] == 0.0
    # stored rows are re-expressed in the new frame: the same theta
    torch.testing.assert_close(model.theta_norm.inverse(model.data.theta), stored_theta)
    model.update(theta, x, y, centre=np.full(P, -0.3), steps=5)
    np.testing.assert_allclose(model.theta_norm.loc.numpy()[[0, 2]], -0.3)


def test_the_warp_learns_each_controls_own_resonance():
    """A bank of resonant weights, ``y_o = sum_i x_i L(theta_oi)``, with a Lorentzian ``L``
    about as wide as the data's spread (a ring per weight). The per-control warp can become
    ``L``; without it the network must build a resonance per control from shared units.
    Measured (seeds 11 / 12): theta-part R^2 0.972 / 0.976 with the warp, 0.29 / 0.23 without."""
    rng = np.random.default_rng(11)
    n_out, n_in = 6, 8
    centre = rng.uniform(-0.3, 0.3, n_out * n_in)

    def bank(theta, x):
        w = 2 / (1 + ((theta - centre) / 0.5) ** 2) - 1
        return np.einsum("noi,ni->no", w.reshape(-1, n_out, n_in), x)

    def draw(n):
        theta = np.repeat(rng.uniform(-1, 1, (n, n_out * n_in)), 16, 0)
        x = rng.uniform(0, 1, (len(theta), n_in))
        return theta, x, bank(theta, x)

    train, test = draw(800), draw(60)
    zero = np.zeros(n_out * n_in)
    d_true = test[2] - bank(np.broadcast_to(zero, test[0].shape), test[1])
    r2 = {}
    for warp in (0, 4):
        model = make_surrogate(
            "hyper", structure_kw={"param_warp": warp}, max_steps=3000, seed=11, n_members=2
        ).fit(*train)
        with torch.no_grad():
            d = (model.predict(test[0], test[1]) - model.predict(zero, test[1])).double().numpy()
        r2[warp] = 1 - ((d - d_true) ** 2).sum() / (d_true**2).sum()
    assert r2[4] > 0.9 and r2[0] < r2[4] - 0.3, r2


def test_the_lasso_shrinks_the_theta_path_in_proportion_to_the_held_out_error():
    """``l1`` pulls the linear ``theta`` path's weights towards 0, per member in proportion to
    its held-out RMS error (the noise it fits against), and still lets a clean device fit."""
    rng = np.random.default_rng(14)
    theta, x, y = rows(120, 8, rng)
    noisy = y + 1.0 * rng.normal(size=y.shape)
    norms = {}
    for name, target, l1 in (("off", noisy, 0.0), ("on", noisy, 1e-3), ("clean", y, 1e-3)):
        model = make_surrogate(
            "hyper",
            structure_kw={"l1": l1},
            max_steps=400,
            eval_every=25,
            patience=100,
            seed=14,
            n_members=2,
        ).fit(theta, x, target)
        norms[name] = float(model.model.coef_linear.weight.abs().sum())
    assert norms["on"] < 0.5 * norms["off"], norms
    assert heldout_r2(model, *rows(30, 8, rng))[0] > 0.8  # the clean fit
    structure = model.model
    w = structure.coef_linear.weight.abs().sum(dim=(1, 2))
    torch.testing.assert_close(
        structure.penalty(torch.tensor([2.0, 0.5])), 1e-3 * (2 * w[0] + 0.5 * w[1])
    )
    # phases are left alone: an all-periodic device gets no lasso
    phases = make_surrogate(
        "hyper", structure_kw={"l1": 1e-3}, periodic=[True] * P, max_steps=5
    ).fit(theta, x, y)
    assert phases.model.penalty() == 0.0
