"""The ``mzi`` simulator: a Clements mesh against a plain per-MZI reference, unitarity, the
three views, chip draws, drift and float32 (the contract it shares with the other simulators
is in ``test_sim_contract.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blackbox_sat.sim.mzi import MZIMesh, mzi

TWO_PI = 2 * np.pi
QUIET = dict(noise=0.0, programming_noise=0.0, dac_bits=None)


def _theta(dev, seed=0, margin=0.2):
    """Random setting away from the wrap point (crosstalk jumps there)."""
    return np.random.default_rng(seed).uniform(margin, TWO_PI - margin, dev.n_params)


def _inputs(n, batch=32, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, n))


def _reference_u(dev, theta):
    """The documented physics written out MZI by MZI in numpy, independent of the module's
    vectorised index maps."""
    n, layout = dev.n_modes, dev.layout
    m = len(layout)
    p = np.mod(theta, TWO_PI)
    applied = p.copy()
    for j, (c, top) in enumerate(layout):
        for k, (c2, top2) in enumerate(layout):
            if c2 == c and abs(top2 - top) == 2:  # neighbouring heater in the same column
                applied[j] += dev.crosstalk * p[k]
                applied[m + j] += dev.crosstalk * p[m + k]
    applied += dev.phase_offset + dev.beta_j * dev.drift
    u = np.eye(n, dtype=complex)
    for j, (_c, top) in enumerate(layout):
        dcs = []
        for e in dev.bs_error[j]:
            t, k = np.sqrt((1 + e) / 2), np.sqrt((1 - e) / 2)
            dcs.append(np.array([[t, 1j * k], [1j * k, t]]))
        ph = lambda a: np.diag([np.exp(1j * a), 1.0])  # noqa: E731
        block = dcs[1] @ ph(applied[j]) @ dcs[0] @ ph(applied[m + j])
        full = np.eye(n, dtype=complex)
        full[top : top + 2, top : top + 2] = block
        u = full @ u
    return u


def _true(dev, theta, x, dtype=torch.float64):
    with torch.no_grad():
        return dev.true_model()(
            torch.as_tensor(theta, dtype=dtype), torch.as_tensor(x, dtype=dtype)
        ).numpy()


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_contract_members(n):
    dev = mzi(n_modes=n)
    m = n * (n - 1) // 2
    assert isinstance(dev, MZIMesh)
    assert dev.n_params == 2 * m and dev.in_dim == n and dev.out_dim == n
    assert len(dev.layout) == m and dev.bs_error.shape == (m, 2)
    low, high = dev.bounds
    assert low.shape == high.shape == (2 * m,)
    assert np.all(low == 0) and np.allclose(high, TWO_PI)
    assert dev.periodic is True and dev.input_bounds == (-1.0, 1.0) and dev.full_scale == 1.0
    # every MZI sits on a valid pair, and each column's MZIs are disjoint
    for c in range(n):
        tops = dev.layout[dev.layout[:, 0] == c, 1]
        assert np.all(tops % 2 == c % 2) and np.all(tops + 1 < n)
    y = dev.query(_theta(dev), _inputs(n, 4))
    assert y.shape == (4, n) and np.all(np.isfinite(y))


def test_config_and_sibling():
    dev = mzi(seed=3, sigma=0.2, n_modes=6, crosstalk=0.03)
    for key in (
        "seed",
        "sigma",
        "noise",
        "n_modes",
        "drift",
        "sigma_phase",
        "crosstalk",
        "programming_noise",
        "dac_bits",
    ):
        assert key in dev.config
    other = dev.sibling(seed=101)
    assert isinstance(other, MZIMesh) and other.n_modes == 6 and other.crosstalk == 0.03
    assert other.sigma == 0.2 and not np.allclose(other.bs_error, dev.bs_error)
    warm = dev.sibling(drift=1.0)
    assert warm.drift == 1.0 and np.array_equal(warm.bs_error, dev.bs_error)


@pytest.mark.parametrize("n", [5, 6])
def test_transfer_matrix_matches_reference(n):
    dev = mzi(seed=2, n_modes=n, drift=0.7, crosstalk=0.04)
    theta = _theta(dev)
    u = _reference_u(dev, theta)
    np.testing.assert_allclose(dev.transfer_matrix(theta), u, atol=1e-12)
    x = _inputs(n, 7)
    field = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ u.T  # row b: U @ x_b
    np.testing.assert_allclose(_true(dev, theta, x), np.abs(field) ** 2, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(sigma=0.0, crosstalk=0.0), dict(sigma=0.15, drift=1.0)])
def test_unitary(kw):
    dev = mzi(n_modes=8, **kw)
    u = dev.transfer_matrix(_theta(dev, seed=4))
    np.testing.assert_allclose(u @ u.conj().T, np.eye(8), atol=1e-10)


def test_bar_state_is_identity_on_nominal():
    dev = mzi(n_modes=6, crosstalk=0.0)
    x = _inputs(6, 8)
    with torch.no_grad():
        y = dev.nominal_model()(
            torch.full((dev.n_params,), np.pi, dtype=torch.float64), torch.as_tensor(x)
        ).numpy()
    np.testing.assert_allclose(y, x**2 / (x**2).sum(1, keepdims=True), atol=1e-12)


def test_read_noise_at_documented_level():
    dev = mzi(n_modes=16, programming_noise=0.0, dac_bits=None)  # default read noise only
    theta, x = _theta(dev), _inputs(16, 128)
    resid = np.concatenate([dev.query(theta, x) - _true(dev, theta, x) for _ in range(4)])
    assert dev.read.std / 1.5 < resid.std() < dev.read.std * 1.5
    assert 0.002 <= dev.read.std <= 0.005


def test_default_query_noise_is_modest():
    dev = mzi(n_modes=16)  # DAC + programming noise + read noise
    theta, x = _theta(dev), _inputs(16, 128)
    resid = np.concatenate([dev.query(theta, x) - _true(dev, theta, x) for _ in range(4)])
    assert dev.read.std < resid.std() < 4 * dev.read.std


def test_power_conserved_and_zero_input():
    dev = mzi(n_modes=8, sigma=0.3, drift=-1.0, **QUIET)
    x = _inputs(8, 16)
    x[0] = 0.0
    y = dev.query(_theta(dev), x)
    np.testing.assert_allclose(y[1:].sum(1), 1.0, atol=1e-10)
    assert np.all(np.isfinite(y)) and np.allclose(y[0], 0.0)
    # the physics normalises: scaling an input does not change the output
    np.testing.assert_allclose(dev.query(_theta(dev), 0.3 * x[1:]), y[1:], atol=1e-10)


def test_chip_draws():
    a, b, c = mzi(seed=0, n_modes=6), mzi(seed=0, n_modes=6), mzi(seed=1, n_modes=6)
    for name in ("bs_error", "phase_offset", "beta_j"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert not np.allclose(getattr(a, name), getattr(c, name))
    big = mzi(seed=0, n_modes=6, sigma=0.3, drift=2.0)
    np.testing.assert_allclose(big.bs_error, 2 * a.bs_error, rtol=1e-12)
    np.testing.assert_allclose(big.phase_offset, 2 * a.phase_offset, rtol=1e-12)
    np.testing.assert_array_equal(big.beta_j, a.beta_j)
    split = mzi(seed=0, n_modes=6, sigma_phase=0.05)
    np.testing.assert_array_equal(split.bs_error, a.bs_error)
    np.testing.assert_allclose(split.phase_offset, a.phase_offset / 3, rtol=1e-12)
    assert 0.1 < a.beta_j.mean() < 0.2  # rad/K, from dn/dT over the heater length


def test_nominal_versus_true():
    errs = mzi(n_modes=6, sigma=0.15)
    theta, x = _theta(errs), _inputs(6)
    with torch.no_grad():
        nom = errs.nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy()
    assert np.abs(nom - _true(errs, theta, x)).max() > 1e-2
    clean = mzi(n_modes=6, sigma=0.0)
    np.testing.assert_allclose(_true(clean, theta, x), nom, atol=1e-12)
    # the design's crosstalk is in the datasheet: a different kappa is not
    other = mzi(n_modes=6, sigma=0.0, crosstalk=0.0)
    with torch.no_grad():
        nom0 = other.nominal_model()(torch.as_tensor(theta), torch.as_tensor(x)).numpy()
    assert np.abs(nom0 - nom).max() > 1e-3


def test_drift_is_not_common_mode():
    dev = mzi(n_modes=16)
    theta, x = _theta(dev), _inputs(16, 64)
    base = _true(dev, theta, x)
    np.testing.assert_array_equal(_true(dev.sibling(drift=0.0), theta, x), base)
    for d in (-1.0, 1.0):
        assert np.abs(_true(dev.sibling(drift=d), theta, x) - base).mean() > 5e-3
    # even a perfectly uniform coefficient is not removable: it enters the splitting ratios
    uniform = mzi(n_modes=16, beta_spread=0.0)
    assert (
        np.abs(_true(uniform.sibling(drift=1.0), theta, x) - _true(uniform, theta, x)).mean() > 5e-3
    )


def test_float32_model():
    dev = mzi(n_modes=16)
    theta, x = _theta(dev), _inputs(16, 8)
    theta32 = torch.as_tensor(theta, dtype=torch.float32).requires_grad_(True)
    y32 = dev.true_model()(theta32, torch.as_tensor(x, dtype=torch.float32))
    assert y32.dtype == torch.float32
    y32.sum().backward()
    assert theta32.grad is not None and theta32.grad.dtype == torch.float32
    np.testing.assert_allclose(y32.detach().numpy(), _true(dev, theta, x), atol=1e-4)


@pytest.mark.parametrize("n", [32, 64])
def test_large_meshes(n):
    dev = mzi(n_modes=n, drift=1.0)
    assert dev.n_params == n * (n - 1)
    theta = torch.as_tensor(_theta(dev), dtype=torch.float32).requires_grad_(True)
    y = dev.true_model()(theta, torch.as_tensor(_inputs(n, 16), dtype=torch.float32))
    y.square().sum().backward()
    assert y.shape == (16, n) and torch.isfinite(theta.grad).all()
    np.testing.assert_allclose(y.detach().sum(1).numpy(), 1.0, atol=1e-4)
    assert dev.query(_theta(dev), _inputs(n, 4)).shape == (4, n)
