"""The ``mrr`` simulator: its error draws, views, weights and drift physics (the contract it
shares with the other simulators is in ``test_sim_contract.py``)."""

import numpy as np
import torch

from blackbox_sat.sim.mrr import FWHM, I_MAX, THERMAL_SHIFT, MRRWeightBank, mrr, start_weights

EXACT = dict(noise=0.0, programming_noise=0.0, dac_bits=None)


def _theta(dev, seed=0):
    return np.random.default_rng(seed).uniform(0, I_MAX, dev.n_params)


def _x(dev, n=64, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, dev.in_dim))


def _true(dev, theta, x, dtype=torch.float64):
    with torch.no_grad():
        return dev.true_model()(
            torch.as_tensor(theta, dtype=dtype), torch.as_tensor(x, dtype=dtype)
        ).numpy()


def test_default_read_noise_level():
    dev = mrr(programming_noise=0.0, dac_bits=None)  # read noise at its default only
    theta, x = _theta(dev), _x(dev, 2000)
    residual = dev.query(theta, x) - _true(dev, theta, x)
    assert dev.full_scale == dev.in_dim
    assert abs(residual.std() / (0.003 * dev.in_dim) - 1) < 0.05
    # DAC and programming noise are on by default too: the applied setting differs per query
    dev = mrr(noise=0.0)
    assert not np.allclose(dev.query(theta, x[:4]), dev.query(theta, x[:4]))


def test_sigma_rescales_the_draw():
    small, big = mrr(seed=3, sigma=0.1), mrr(seed=3, sigma=0.6, drift=0.5, crosstalk=0.0)
    np.testing.assert_allclose(big.resonance_offset, 6 * small.resonance_offset, rtol=1e-12)
    np.testing.assert_allclose(
        np.log(big.heater_gain), 6 * np.log(small.heater_gain), rtol=1e-9, atol=1e-14
    )
    np.testing.assert_allclose(
        np.log(big.linewidth / FWHM), 6 * np.log(small.linewidth / FWHM), rtol=1e-9, atol=1e-14
    )
    assert np.all(small.resonance_offset != 0)


def test_sibling_rebuilds_the_same_kind():
    dev = mrr(seed=5, sigma=0.2, in_dim=4, out_dim=2, crosstalk=0.01)
    other = dev.sibling(drift=1.0)
    assert isinstance(other, MRRWeightBank) and other.config == {**dev.config, "drift": 1.0}
    np.testing.assert_array_equal(other.resonance_offset, dev.resonance_offset)


def test_nominal_equals_true_only_without_errors():
    theta = _theta(mrr())
    x = _x(mrr())
    for xt in (0.0, 0.05):  # the design's crosstalk is part of the datasheet
        clean = mrr(sigma=0.0, crosstalk=xt)
        with torch.no_grad():
            nominal = clean.nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(_true(clean, theta, x), nominal, rtol=0, atol=1e-12)
        for kw in (dict(), dict(sigma=0.0, drift=0.1), dict(sigma=0.1)):
            dev = mrr(crosstalk=xt, **kw)
            with torch.no_grad():  # the nominal view never sees fabrication errors or drift
                np.testing.assert_allclose(
                    dev.nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy(), nominal
                )
            assert np.abs(_true(dev, theta, x) - nominal).max() > 1e-3, kw
    with torch.no_grad():
        a = mrr(crosstalk=0.0).nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy()
        b = mrr(crosstalk=0.05).nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy()
    assert np.abs(a - b).max() > 1e-3


def test_weights_span_minus_one_to_one_and_stay_in_range():
    dev = mrr()
    for s in range(5):
        w = dev.weights(_theta(dev, s))
        assert w.min() >= -1 and w.max() <= 1
    # one nominal ring swept over the heater range: through resonance, far off on both sides
    ring = mrr(in_dim=1, out_dim=1)
    sweep = np.array(
        [ring.weights(np.array([i]), nominal=True)[0, 0] for i in np.linspace(0, I_MAX, 501)]
    )
    assert sweep.max() > 0.999 and sweep[0] < -0.85 and sweep[-1] < -0.85
    peak = np.linspace(0, I_MAX, 501)[sweep.argmax()]
    assert 0.2 * I_MAX < peak < 0.9 * I_MAX


def test_theta0_is_the_datasheet_start_pattern():
    dev, other = mrr(seed=0), mrr(seed=7, sigma=0.5, drift=1.0)
    np.testing.assert_array_equal(dev.theta0, other.theta0)  # chip-independent
    no_xt = mrr(crosstalk=0.0)  # theta0 inverts an isolated datasheet ring
    np.testing.assert_allclose(
        no_xt.weights(no_xt.theta0, nominal=True), start_weights(10, 16), atol=1e-12
    )
    assert np.abs(start_weights(10, 16)).max() <= 0.5 and start_weights(10, 16).std() > 0.1


def test_drift_moves_resonances_by_80_pm_per_kelvin():
    dev = mrr()
    w = dev.weights(dev.theta0)
    np.testing.assert_array_equal(dev.sibling(drift=0.0).weights(dev.theta0), w)
    for drift in (1.0, -1.0):
        change = np.abs(dev.sibling(drift=drift).weights(dev.theta0) - w)
        assert change.mean() > 0.3, (
            drift,
            change.mean(),
        )  # about half a linewidth moves weights a lot
    # exact size of the shift on an error-free ring: drift of 1 K == heater shift of 80 pm
    clean = mrr(sigma=0.0, crosstalk=0.0, in_dim=1, out_dim=1)
    i0 = 1.2
    shifted = clean.sibling(drift=1.0).weights(np.array([i0]))
    i1 = np.sqrt(i0**2 + THERMAL_SHIFT / 0.1)  # ETA * R = 0.1 nm/mA^2
    np.testing.assert_allclose(shifted, clean.weights(np.array([i1])), atol=1e-12)


def test_drift_is_common_mode_by_default_and_per_ring_with_drift_spread():
    dev, spread = mrr(seed=2), mrr(seed=2, drift_spread=0.1)
    np.testing.assert_array_equal(dev.thermal_shift, np.full((10, 16), THERMAL_SHIFT))
    # the spread leaves this chip's fabrication draws and its undrifted weights alone
    np.testing.assert_array_equal(spread.resonance_offset, dev.resonance_offset)
    np.testing.assert_array_equal(spread.weights(dev.theta0), dev.weights(dev.theta0))
    rel = spread.thermal_shift / THERMAL_SHIFT - 1
    assert 0.05 < rel.std() < 0.15 and abs(rel.mean()) < 0.03
    hot, hot_spread = dev.sibling(drift=1.0), spread.sibling(drift=1.0)
    assert not np.allclose(hot.weights(dev.theta0), hot_spread.weights(dev.theta0))
    # the calibration truth carries each ring's own shift
    truth = hot_spread.calibration_truth()["offset"].numpy()
    np.testing.assert_allclose(truth, spread.resonance_offset + spread.thermal_shift, atol=1e-12)


def test_crosstalk_reaches_neighbours_on_the_same_bus_only():
    dev = mrr(sigma=0.0, in_dim=4, out_dim=2)
    base = dev.weights(np.zeros(8))
    theta = np.zeros(8)
    theta[1] = 2.0  # bus 0, ring 1
    w = dev.weights(theta)
    assert np.all(w[0, [0, 2]] != base[0, [0, 2]])  # neighbours heated
    assert abs(w[0, 0] - base[0, 0]) > abs(w[0, 3] - base[0, 3]) > 0  # decays with distance
    np.testing.assert_array_equal(w[1], base[1])  # other bus untouched
