"""The ``freespace`` simulator: its display, error draws, views, misalignment and gradients
through the warps (the shared contract is in ``test_sim_contract.py``)."""

import numpy as np
import pytest
import torch

from blackbox_sat.sim.freespace import FreeSpaceVMM, bilinear_taps, freespace
from blackbox_sat.sim.mrr import start_weights

EXACT = dict(noise=0.0, programming_noise=0.0, dac_bits=None)


def _theta(dev, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, dev.n_params)


def _x(dev, n=64, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, dev.in_dim))


def _run(model, theta, x, dtype=torch.float64):
    with torch.no_grad():
        return model(torch.as_tensor(theta, dtype=dtype), torch.as_tensor(x, dtype=dtype)).numpy()


def _one_block(dev, row, col):
    theta = np.zeros((dev.rows, dev.in_dim))
    theta[row, col] = 1.0
    return theta.ravel()


def test_display_size_follows_the_weights():
    dev = freespace(in_dim=5, out_dim=3, pixels_per_weight=2)
    assert (dev.rows, dev.height, dev.width) == (6, 12, 10)  # two rows (signs) per output


def test_query_equals_the_misaligned_true_model_without_noise():
    dev = freespace(rotation=1.0, shift=0.5, scale=1.02, **EXACT)
    theta, x = _theta(dev), _x(dev)
    np.testing.assert_allclose(
        dev.query(theta, x), _run(dev.true_model(), theta, x), rtol=0, atol=1e-10
    )


def test_default_read_noise_level_and_display_range():
    dev = freespace(programming_noise=0.0, dac_bits=None)
    theta, x = _theta(dev), _x(dev, 2000)
    residual = dev.query(theta, x) - _run(dev.true_model(), theta, x)
    assert dev.full_scale == dev.in_dim
    assert abs(residual.std() / (0.003 * dev.in_dim) - 1) < 0.05
    noisy = freespace(noise=0.0, programming_noise=0.05)
    applied = noisy.applied_setting(np.ones(noisy.n_params))
    assert applied.max() <= 1.0 and applied.min() < 1.0  # programming noise, clipped to the display


def test_sigma_rescales_the_draw():
    small, big = (
        freespace(seed=3, sigma=0.01),
        freespace(seed=3, sigma=0.05, rotation=2.0, shift=1.0),
    )
    np.testing.assert_allclose(
        np.log(big.pixel_gain), 5 * np.log(small.pixel_gain), rtol=1e-9, atol=1e-14
    )
    np.testing.assert_allclose(
        np.log(big.detector_gain), 5 * np.log(small.detector_gain), rtol=1e-9, atol=1e-14
    )
    assert 0.025 < np.log(freespace().pixel_gain).std() < 0.035


def test_sibling_rebuilds_the_same_kind():
    dev = freespace(seed=5, in_dim=4, out_dim=2, pixels_per_weight=3)
    other = dev.sibling(rotation=1.0)
    assert isinstance(other, FreeSpaceVMM) and other.config == {**dev.config, "rotation": 1.0}
    np.testing.assert_array_equal(other.pixel_gain, dev.pixel_gain)


def test_nominal_is_the_ideal_differential_matrix():
    dev = freespace(sigma=0.0, **EXACT)
    theta, x = _theta(dev), _x(dev)
    blocks = theta.reshape(dev.rows, dev.in_dim)
    np.testing.assert_allclose(dev.cells(theta, nominal=True), blocks, rtol=0, atol=1e-14)
    expected = x @ (blocks[0::2] - blocks[1::2]).T
    np.testing.assert_allclose(_run(dev.nominal_model(), theta, x), expected, atol=1e-12)
    np.testing.assert_allclose(_run(dev.true_model(), theta, x), expected, atol=1e-12)


def test_perturbations_act_on_the_true_model_only():
    ref = freespace()
    theta, x = _theta(ref), _x(ref)
    nominal = _run(ref.nominal_model(), theta, x)
    for kw in (
        dict(),
        dict(sigma=0.0, rotation=1.0),
        dict(sigma=0.0, shift=1.0),
        dict(sigma=0.0, scale=1.05),
    ):
        dev = freespace(**kw)
        np.testing.assert_array_equal(_run(dev.nominal_model(), theta, x), nominal)
        assert np.abs(_run(dev.true_model(), theta, x) - nominal).max() > 1e-3, kw


def test_identity_warp_is_exact():
    dev = freespace(pixels_per_weight=3)
    image = np.random.default_rng(0).uniform(size=(dev.height, dev.width))
    np.testing.assert_array_equal(dev.warp(image), image)
    _index, weight = bilinear_taps(dev.height, dev.width)
    np.testing.assert_array_equal(weight.sum(1), 1.0)


def test_one_pixel_shift_moves_a_bright_block_by_one_pixel():
    dev = freespace(sigma=0.0, shift=1.0, **EXACT)
    image = dev.mask_image(_one_block(dev, 5, 7))
    expected = np.zeros_like(image)
    expected[1:, 1:] = image[:-1, :-1]
    np.testing.assert_array_equal(dev.warp(image), expected)
    # seen by the detectors: a quarter of the block's light moves into each neighbouring cell
    cells = dev.cells(_one_block(dev, 5, 7))
    p = dev.p
    assert cells[5, 7] == pytest.approx((p - 1) ** 2 / p**2)
    assert cells[6, 7] == pytest.approx((p - 1) / p**2) and cells[5, 8] == pytest.approx(
        (p - 1) / p**2
    )
    assert cells[6, 8] == pytest.approx(1 / p**2) and cells.sum() == pytest.approx(1.0)
    # a shift along x only
    only_x = freespace(sigma=0.0, shift=(1.0, 0.0))
    cells = only_x.cells(_one_block(only_x, 5, 7))
    assert cells[5, 7] == pytest.approx(1 - 1 / p) and cells[5, 8] == pytest.approx(1 / p)


def test_rotation_and_scale_blend_neighbours_and_change_outputs():
    base = freespace()
    theta, x = _theta(base), _x(base)
    y = _run(base.true_model(), theta, x)
    for kw in (
        dict(rotation=0.5),
        dict(rotation=2.0),
        dict(scale=1.025),
        dict(scale=1.1),
        dict(shift=0.5),
    ):
        dev = base.sibling(**kw)
        assert np.abs(_run(dev.true_model(), theta, x) - y).mean() > 1e-3, kw
    # rotation about the centre: a block at the centre barely moves, a corner block moves more
    rot = freespace(sigma=0.0, rotation=2.0)
    corner = rot.cells(_one_block(rot, 0, 0))
    centre = rot.cells(_one_block(rot, rot.rows // 2, rot.in_dim // 2))
    assert centre.max() > corner.max()
    # magnification spreads the outer blocks outwards
    big = freespace(sigma=0.0, scale=1.1)
    cells = big.cells(_one_block(big, 0, 0))
    assert cells[0, 0] < 1


def test_cells_match_the_explicit_image_pipeline():
    dev = freespace(seed=2, rotation=1.3, shift=(0.7, -0.4), scale=1.03, pixels_per_weight=3)
    theta = _theta(dev)
    seen = dev.warp(dev.mask_image(theta) * dev.pixel_gain)
    pooled = seen.reshape(dev.rows, dev.p, dev.in_dim, dev.p).mean((1, 3))
    np.testing.assert_allclose(dev.cells(theta), pooled, atol=1e-12)


def test_theta0_is_the_datasheet_start_pattern():
    dev, other = freespace(), freespace(seed=9, sigma=0.05, rotation=2.0)
    np.testing.assert_array_equal(dev.theta0, other.theta0)
    blocks = dev.cells(dev.theta0, nominal=True)
    np.testing.assert_allclose(blocks[0::2] - blocks[1::2], start_weights(10, 16), atol=1e-12)


def test_nonlinearity_saturates_both_views():
    lin, sat = freespace(sigma=0.0), freespace(sigma=0.0, nonlinearity=True)
    theta = np.zeros(lin.n_params)
    theta[: lin.in_dim] = 1.0  # positive row of output 0 fully open
    x = np.ones((1, lin.in_dim))
    assert _run(lin.true_model(), theta, x)[0, 0] == pytest.approx(16.0)
    assert _run(sat.true_model(), theta, x)[0, 0] == pytest.approx(4 * (1 - np.exp(-4)))
    assert _run(sat.nominal_model(), theta, x)[0, 0] == pytest.approx(4 * (1 - np.exp(-4)))


def test_gradients_match_finite_differences():
    dev = freespace(in_dim=3, out_dim=2, rotation=1.5, shift=0.3, scale=1.04, nonlinearity=2.0)
    theta = torch.tensor(_theta(dev), dtype=torch.float64, requires_grad=True)
    x = torch.tensor(_x(dev, 4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dev.true_model(), (theta, x), eps=1e-6, atol=1e-6)
