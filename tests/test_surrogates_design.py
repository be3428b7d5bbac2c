"""Query design: trust regions, Sobol global points, repeats, inputs per setting, noise."""

import numpy as np
import pytest

from surrogates.design import (
    design_settings,
    estimate_noise,
    inputs_per_setting,
    space_filling,
    trust_region,
    wrap,
)

LOW = np.array([0.0, -1.0, 0.0, 0.0])
HIGH = np.array([1.0, 1.0, 2 * np.pi, 10.0])


def _normalised_distance(a, b, periodic):
    """L-infinity distance in bound widths, the short way round for periodic columns."""
    d = (a - b) / (HIGH - LOW)
    d = np.where(periodic, (d + 0.5) % 1.0 - 0.5, d)
    return np.abs(d).max(axis=-1)


@pytest.mark.parametrize("method", ["sobol", "uniform"])
def test_trust_region_points_within_radius_and_bounds(method):
    center = np.array([0.5, 0.0, 3.0, 5.0])
    pts = trust_region(center, 0.05, 300, LOW, HIGH, rng=0, method=method)
    assert pts.shape == (300, 4)
    assert np.all(_normalised_distance(pts, center, np.zeros(4, bool)) <= 0.05 + 1e-12)
    assert np.all((pts >= LOW) & (pts <= HIGH))
    # it fills the box rather than collapsing onto the centre
    assert np.all(np.abs(pts - center).max(axis=0) > 0.8 * 0.05 * (HIGH - LOW))


def test_trust_region_shells_cover_every_distance_from_the_centre():
    center = np.array([0.02, 0.0, 3.0, 5.0])  # near a bound, too
    periodic = np.array([False, False, True, False])
    box = trust_region(center, 0.05, 512, LOW, HIGH, periodic=periodic, rng=0)
    shells = trust_region(center, 0.05, 512, LOW, HIGH, periodic=periodic, rng=0, spread="shells")
    assert np.all(_normalised_distance(shells, center, periodic) <= 0.05 + 1e-12)
    assert np.all((shells >= LOW) & (shells <= HIGH))
    # mean distance (L2, bound widths) from the centre: the box has none close in; shells do
    d_box = np.linalg.norm((box - center) / (HIGH - LOW), axis=1)
    d_shells = np.linalg.norm((shells - center) / (HIGH - LOW), axis=1)
    assert np.mean(d_box < 0.01) < 0.005 and np.mean(d_shells < 0.01) > 0.1


def test_trust_region_clipped_at_a_bound_stays_inside_without_piling_up():
    center = np.array([0.0, 1.0, 3.0, 10.0])  # on the bounds
    pts = trust_region(center, 0.1, 200, LOW, HIGH, rng=1)
    assert np.all((pts >= LOW) & (pts <= HIGH))
    assert np.mean(pts[:, 0] == 0.0) < 0.05  # intersected box, not clipped points


def test_trust_region_wraps_periodic_parameters():
    periodic = np.array([False, False, True, False])
    center = np.array([0.5, 0.0, 0.05, 5.0])  # a phase near 0: the box crosses 0 == 2 pi
    pts = trust_region(center, 0.1, 500, LOW, HIGH, periodic=periodic, rng=2)
    assert np.all((pts[:, 2] >= 0) & (pts[:, 2] < 2 * np.pi))
    assert np.any(pts[:, 2] > np.pi)  # wrapped round to just below 2 pi
    assert np.all(_normalised_distance(pts, center, periodic) <= 0.1 + 1e-12)


def test_wrap_and_clip():
    periodic = np.array([False, False, True, False])
    out = wrap(np.array([[2.0, -3.0, 2 * np.pi + 0.5, -1.0]]), LOW, HIGH, periodic)
    np.testing.assert_allclose(out, [[1.0, -1.0, 0.5, 0.0]])


def test_space_filling_is_seeded_sobol_over_the_box():
    a = space_filling(64, LOW, HIGH, rng=3)
    b = space_filling(64, LOW, HIGH, rng=3)
    np.testing.assert_array_equal(a, b)
    assert np.all((a >= LOW) & (a < HIGH))
    # balanced: each half of every coordinate holds exactly half of 64 Sobol points
    upper = a > (LOW + HIGH) / 2
    np.testing.assert_array_equal(upper.sum(axis=0), 32)


def test_design_settings_global_fraction_and_repeats():
    center = np.array([0.5, 0.0, 3.0, 5.0])
    periodic = np.array([False, False, True, False])
    d = design_settings(
        center, 0.02, 200, LOW, HIGH, global_fraction=0.1, repeats=12, periodic=periodic, seed=4
    )
    assert d.settings.shape == (212, 4) and len(d) == 212
    original = ~d.is_repeat
    assert original.sum() == 200 and d.is_repeat.sum() == 12
    assert d.is_global[original].sum() == 20
    local = original & ~d.is_global
    assert np.all(_normalised_distance(d.settings[local], center, periodic) <= 0.02 + 1e-12)
    # global points go far beyond the trust region
    assert (
        np.median(_normalised_distance(d.settings[original & d.is_global], center, periodic)) > 0.1
    )
    # repeats are identical copies of earlier original rows, distinct ones
    src = d.repeat_of[d.is_repeat]
    assert np.all(src < 200) and np.all(src >= 0) and len(np.unique(src)) == 12
    np.testing.assert_array_equal(d.settings[d.is_repeat], d.settings[src])
    # the designed originals are distinct settings
    assert len(np.unique(d.settings[original], axis=0)) == 200


def test_design_settings_seeded():
    center = np.full(4, 0.5) * (LOW + HIGH)
    a = design_settings(center, 0.05, 30, LOW, HIGH, repeats=3, seed=5)
    b = design_settings(center, 0.05, 30, LOW, HIGH, repeats=3, seed=5)
    np.testing.assert_array_equal(a.settings, b.settings)


def test_inputs_per_setting_distinct_rows_within_each_setting():
    pool = np.arange(40 * 3, dtype=float).reshape(40, 3)
    xs, idx = inputs_per_setting(pool, 25, 16, rng=6, return_indices=True)
    assert xs.shape == (25, 16, 3) and idx.shape == (25, 16)
    for s in range(25):
        assert len(np.unique(idx[s])) == 16
        np.testing.assert_array_equal(xs[s], pool[idx[s]])
    assert len({tuple(i) for i in idx}) > 1  # settings get different inputs
    with pytest.raises(ValueError):
        inputs_per_setting(pool, 2, 41, rng=0)


def test_estimate_noise_recovers_known_std():
    rng = np.random.default_rng(7)
    sigma = np.array([0.01, 0.1, 1.0])
    truth = rng.normal(size=(300, 1, 3)) * 5  # a different value per query
    y = truth + rng.normal(size=(300, 4, 3)) * sigma  # measured 4 times each
    np.testing.assert_allclose(estimate_noise(y), sigma, rtol=0.1)
    flat = y.reshape(-1, 3)
    groups = np.repeat(np.arange(300), 4)
    np.testing.assert_allclose(estimate_noise(flat, groups), estimate_noise(y), rtol=1e-12)
    with pytest.raises(ValueError):
        estimate_noise(flat[:5], np.arange(5))
