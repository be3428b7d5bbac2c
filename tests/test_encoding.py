"""The fixed encoding (docs/protocol.md): standardize, PCA, 3-sigma scale and clip, map to bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA

from blackbox_sat.data.encoding import FixedEncoding, hybrid_features
from blackbox_sat.data.tasks import load_task


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


@pytest.fixture(scope="module")
def iris():
    return load_task("iris")


def _unmap(enc, y):
    """Device inputs back to [-1, 1] (inverse of step 4)."""
    return 2 * (y - enc.low) / (enc.high - enc.low) - 1


def test_output_within_scalar_and_array_bounds(digits):
    enc = FixedEncoding.fit(digits.x_train, 16, -1.0, 1.0)
    for x in (digits.x_train, digits.x_val, digits.x_test):
        y = enc.transform(x)
        assert y.shape == (len(x), 16) and np.all(y >= -1) and np.all(y <= 1)
    low = np.linspace(0.0, 1.0, 16)
    high = low + np.linspace(0.5, 3.0, 16)
    enc = FixedEncoding.fit(digits.x_train, 16, low, high)
    y = enc.transform(digits.x_test * 1.5)  # out-of-distribution inputs get clipped
    assert np.all(y >= low) and np.all(y <= high)
    assert np.any(np.isclose(y, low)) and np.any(np.isclose(y, high))
    assert np.array_equal(enc(digits.x_test), enc.transform(digits.x_test))


def test_zero_padding_when_features_fewer_than_in_dim(iris):
    low, high = 0.2, 1.0
    enc = FixedEncoding.fit(iris.x_train, 16, low, high)
    assert enc.n_active == 4 and enc.n_components == 16
    y = enc.transform(iris.x_test)
    assert y.shape == (len(iris.x_test), 16)
    assert np.all(y[:, 4:] == pytest.approx(0.6))  # padded slots sit at the midpoint
    assert np.all(y[:, :4].std(axis=0) > 0.01)


def test_components_are_decorrelated_with_std_one_third_on_train(digits):
    enc = FixedEncoding.fit(digits.x_train, 16)
    s = enc.scores(digits.x_train)
    assert s.shape == (1000, 16)
    assert np.allclose(s.std(axis=0), 1 / 3, rtol=1e-10)
    cov = np.cov(s, rowvar=False, ddof=0)
    off = cov - np.diag(np.diag(cov))
    assert np.max(np.abs(off)) < 1e-10
    # variances decrease: these are the leading components
    var = np.var((s * enc.component_std * 3), axis=0)
    assert np.all(np.diff(var) <= 1e-9)


def test_transform_is_clipped_scores_mapped(digits):
    enc = FixedEncoding.fit(digits.x_train, 20, -0.5, 2.0)
    u = _unmap(enc, enc.transform(digits.x_train))
    assert np.allclose(u, np.clip(enc.scores(digits.x_train), -1, 1))
    assert 0 < np.mean(np.abs(u) == 1) < 0.05  # some clipping at 3 sigma, but not much


@pytest.mark.parametrize("n_train,n_features,in_dim", [(1000, 64, 16), (12, 30, 8)])
def test_pca_matches_sklearn_up_to_sign(n_train, n_features, in_dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_train, n_features)) @ rng.normal(size=(n_features, n_features)) + 5
    enc = FixedEncoding.fit(x, in_dim)
    z = (x - x.mean(0)) / x.std(0)
    ref = PCA(n_components=in_dim, svd_solver="full").fit(z)
    k = enc.n_active
    assert k == min(in_dim, n_train - 1)  # centred data has rank n_train - 1 at most
    dots = np.abs(np.sum(enc.components * ref.components_[:k], axis=1))
    assert np.allclose(dots, 1, atol=1e-8)
    # deterministic sign convention: largest-magnitude entry of each axis is positive
    assert np.all(enc.components[np.arange(k), np.argmax(np.abs(enc.components), axis=1)] > 0)


def test_fit_ignores_row_order(digits):
    perm = np.random.default_rng(1).permutation(1000)
    a = FixedEncoding.fit(digits.x_train, 16)
    b = FixedEncoding.fit(digits.x_train[perm], 16)
    assert np.allclose(a.transform(digits.x_test), b.transform(digits.x_test), atol=1e-9)


def test_zero_variance_features_and_rank_deficiency():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 20))
    x[:, 3] = 7.0  # constant feature
    enc = FixedEncoding.fit(x, 8)
    assert enc.scale[3] == 1.0
    assert enc.n_active == 4 and enc.n_components == 8  # 5 centred rows span 4 directions
    y = enc.transform(rng.normal(size=(10, 20)))
    assert np.all(np.isfinite(y)) and np.all(y[:, 4:] == 0)


def test_round_trip_through_json(digits):
    low = np.linspace(-1, 0, 16)
    enc = FixedEncoding.fit(digits.x_train, 16, low, low + 2)
    d = json.loads(json.dumps(enc.to_dict()))
    back = FixedEncoding.from_dict(d)
    assert (back.n_components, back.n_active) == (enc.n_components, enc.n_active)
    assert back.map_to_bounds
    for x in (digits.x_train, digits.x_test):
        assert np.array_equal(back.transform(x), enc.transform(x))
    with pytest.raises(ValueError, match="not a stored fixed encoding"):
        FixedEncoding.from_dict({**d, "kind": "other"})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        FixedEncoding.from_dict({**d, "low": d["low"][:3]})


def test_n_components_sets_the_width_and_no_bounds_map(digits, iris):
    enc = FixedEncoding.fit(digits.x_train, 16, 0.0, 4.0, n_components=8)
    y = enc.transform(digits.x_test)
    assert y.shape == (500, 8) and enc.n_active == 8
    assert np.all(y >= 0) and np.all(y <= 4)
    # the hybrid PNN's call: more PCA features than the device's in_dim, left in [-1, 1]
    low, high = np.zeros(16), np.full(16, 4.0)  # device bounds, ignored without the map
    raw = FixedEncoding.fit(digits.x_train, 16, low, high, n_components=40, map_to_bounds=False)
    y = raw.transform(digits.x_test)
    assert raw.n_components == raw.n_active == 40
    assert y.shape == (500, 40) and y.min() >= -1 and y.max() <= 1 and y.min() < -0.5
    assert np.allclose(y, np.clip(raw.scores(digits.x_test), -1, 1))
    with pytest.raises(ValueError, match=r"input_low must be a scalar or have shape \(40,\)"):
        FixedEncoding.fit(digits.x_train, 16, low, high, n_components=40)
    hyb = hybrid_features(digits.x_train)
    n_varying = int(np.sum(digits.x_train.std(axis=0) > 0))  # some border pixels are always 0
    assert hyb.n_components == 64 and hyb.n_active == n_varying < 64 and not hyb.map_to_bounds
    assert np.all(hyb.transform(digits.x_test)[:, n_varying:] == 0)
    hyb_iris = hybrid_features(iris.x_train)
    assert hyb_iris.transform(iris.x_test).shape == (len(iris.x_test), 4)
    assert FixedEncoding.from_dict(json.loads(json.dumps(hyb.to_dict()))).map_to_bounds is False


def test_input_errors(digits):
    with pytest.raises(ValueError, match=r"input_low must be a scalar or have shape \(16,\)"):
        FixedEncoding.fit(digits.x_train, 16, np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="input_high must exceed input_low"):
        FixedEncoding.fit(digits.x_train, 16, 1.0, 1.0)
    with pytest.raises(ValueError, match="n_components must be at least 1"):
        FixedEncoding.fit(digits.x_train, 16, n_components=0)
    enc = FixedEncoding.fit(digits.x_train, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 64\); got \(3, 63\)"):
        enc.transform(np.zeros((3, 63)))
    bad = digits.x_test[:2].copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        enc.transform(bad)
