"""The contract every built-in simulator meets, one parametrized test over ``mzi``, ``mrr`` and
``freespace``: members, shapes and dtypes, the noise-free query against the true model, chip
identity under a seed, batch invariance, periodicity, siblings and gradients. Physics that
belongs to one device stays in its own ``test_sim_*.py``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from blackbox_sat.devices.contract import describe
from blackbox_sat.sim import BUILTINS
from blackbox_sat.sim.mrr import I_MAX

EXACT = dict(noise=0.0, programming_noise=0.0, dac_bits=None)


@dataclass(frozen=True)
class Sim:
    """A small instance of a built-in and what its datasheet says it offers."""

    name: str
    kw: dict
    dims: tuple  # n_params, in_dim, out_dim
    high: float  # bounds are [0, high] on every control
    periodic: bool
    inputs: tuple  # input_bounds
    kind: str  # class name
    theta0: bool  # a datasheet start pattern (else a seeded draw inside the bounds)

    def make(self, **kw):
        return BUILTINS[self.name](**{**self.kw, **kw})


SIMS = [
    Sim("mzi", {"n_modes": 4}, (12, 4, 4), 2 * np.pi, True, (-1.0, 1.0), "MZIMesh", False),
    Sim(
        "mrr",
        {"in_dim": 5, "out_dim": 3},
        (15, 5, 3),
        I_MAX,
        False,
        (0.0, 1.0),
        "MRRWeightBank",
        True,
    ),
    Sim(
        "freespace",
        {"in_dim": 5, "out_dim": 3, "pixels_per_weight": 2},
        (30, 5, 3),
        1.0,
        False,
        (0.0, 1.0),
        "FreeSpaceVMM",
        True,
    ),
]


@pytest.fixture(params=SIMS, ids=[s.name for s in SIMS])
def sim(request) -> Sim:
    return request.param


def _theta(dev, seed=0):
    """A random setting inside the bounds, away from their edges (mzi's crosstalk jumps at the
    wrap point, so finite differences there would measure the jump)."""
    info = describe(dev)
    u = np.random.default_rng(seed).uniform(0.05, 0.95, info.n_params)
    return info.low + u * (info.high - info.low)


def _x(dev, n=16, seed=1):
    info = describe(dev)
    return np.random.default_rng(seed).uniform(info.input_low, info.input_high, (n, info.in_dim))


def _true(dev, theta, x, dtype=torch.float64):
    with torch.no_grad():
        return (
            dev.true_model()(torch.as_tensor(theta, dtype=dtype), torch.as_tensor(x, dtype=dtype))
            .double()
            .numpy()
        )


def test_members_match_the_datasheet(sim):
    dev = sim.make()
    assert type(dev).__name__ == sim.kind
    info = describe(dev)
    assert (info.n_params, info.in_dim, info.out_dim) == sim.dims
    np.testing.assert_array_equal(info.low, 0.0)
    np.testing.assert_allclose(info.high, sim.high)
    assert info.periodic.tolist() == [sim.periodic] * info.n_params
    np.testing.assert_array_equal(info.input_low, sim.inputs[0])
    np.testing.assert_array_equal(info.input_high, sim.inputs[1])
    assert (info.theta0 is not None) == sim.theta0
    start = info.start(0)
    assert start.shape == (info.n_params,)
    assert np.all((start >= info.low) & (start <= info.high))
    np.testing.assert_array_equal(describe(sim.make()).start(0), start)


def test_query_shape_dtype_and_the_model_in_thetas_dtype(sim):
    dev = sim.make()
    n_params, in_dim, out_dim = sim.dims
    y = dev.query(_theta(dev), _x(dev, 7))
    assert y.shape == (7, out_dim) and y.dtype == np.float64 and np.all(np.isfinite(y))
    out = dev.true_model()(
        torch.zeros(n_params, dtype=torch.float32), torch.ones(2, in_dim, dtype=torch.float64)
    )
    assert out.dtype == torch.float32 and out.shape == (2, out_dim)


def test_noise_free_query_equals_the_true_model(sim):
    dev = sim.make(**EXACT)
    theta, x = _theta(dev), _x(dev, 64)
    np.testing.assert_allclose(dev.query(theta, x), _true(dev, theta, x), rtol=0, atol=1e-10)


def test_a_seed_fixes_the_chip_and_its_noise(sim):
    a, b, c = sim.make(seed=3), sim.make(seed=3), sim.make(seed=4)
    theta, x = _theta(a), _x(a, 32)
    np.testing.assert_array_equal(_true(a, theta, x), _true(b, theta, x))
    assert np.abs(_true(a, theta, x) - _true(c, theta, x)).max() > 1e-3
    # noisy queries: the same sequence from the same seed, fresh noise on every call
    first, again = a.query(theta, x), a.query(theta, x)
    np.testing.assert_array_equal(first, b.query(theta, x))
    np.testing.assert_array_equal(again, b.query(theta, x))
    assert not np.array_equal(first, again)


def test_rows_are_independent_of_the_batch(sim):
    dev = sim.make()
    theta, x = _theta(dev), _x(dev, 9)
    whole = _true(dev, theta, x)
    one_by_one = np.concatenate([_true(dev, theta, x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, one_by_one, rtol=0, atol=1e-12)


def test_periodic_controls_wrap(sim):
    dev = sim.make()
    info = describe(dev)
    theta, x = _theta(dev), _x(dev)
    period = np.where(info.periodic, info.high - info.low, 0.0)
    assert info.periodic.any() == sim.periodic
    for shift in (period, -period):  # a no-op for a device without periodic controls
        np.testing.assert_allclose(
            _true(dev, theta + shift, x), _true(dev, theta, x), rtol=0, atol=1e-10
        )


def test_sibling_keeps_the_chip_and_changes_what_it_is_told(sim):
    dev = sim.make(seed=5)
    same = dev.sibling()
    assert type(same) is type(dev) and same.config == dev.config
    theta, x = _theta(dev), _x(dev)
    np.testing.assert_array_equal(_true(same, theta, x), _true(dev, theta, x))
    other = dev.sibling(seed=101)
    assert other.seed == 101 and other.config == {**dev.config, "seed": 101}
    assert np.abs(_true(other, theta, x) - _true(dev, theta, x)).max() > 1e-3


def test_gradients_match_finite_differences(sim):
    dev = sim.make()
    theta = torch.tensor(_theta(dev), dtype=torch.float64, requires_grad=True)
    x = torch.tensor(_x(dev, 4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dev.true_model(), (theta, x), eps=1e-6, atol=1e-6)
