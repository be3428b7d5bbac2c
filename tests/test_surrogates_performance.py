"""Size and speed of the default surrogate on a 160-parameter device (slow: `make test-all`).

The device is a microring-bank-like synthetic written here: ``y = W(theta) x`` with each of
the 10 x 16 weights a Lorentzian of its own heater (``theta`` squared, with crosstalk from
its neighbours), not the package's simulator.
"""

import time

import numpy as np
import pytest
import torch

from surrogates import make_surrogate
from surrogates.design import design_settings

pytestmark = pytest.mark.slow

OUT, IN = 10, 16
N_PARAMS = OUT * IN


class RingBank:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.detuning0 = torch.tensor(rng.uniform(-1.5, 0.5, (OUT, IN)))
        self.tuning = torch.tensor(rng.uniform(2.5, 3.5, (OUT, IN)))
        self.low, self.high = np.zeros(N_PARAMS), np.ones(N_PARAMS)

    def __call__(self, theta, x):
        """``theta (m, 160)`` or ``(160,)``, ``x (m, 16)`` -> ``(m, 10)``; torch, differentiable."""
        heat = theta.reshape(*theta.shape[:-1], OUT, IN) ** 2
        heat = heat + 0.05 * (torch.roll(heat, 1, -1) + torch.roll(heat, -1, -1))
        w = 2 / (1 + (2 * (self.detuning0 + self.tuning * heat)) ** 2) - 1
        return torch.einsum("...oi,...i->...o", w, x)

    def measure(self, settings, per_setting, rng, noise=0.01):
        theta = np.repeat(settings, per_setting, axis=0)
        x = rng.uniform(0, 1, (len(theta), IN))
        with torch.no_grad():
            y = self(torch.tensor(theta), torch.tensor(x)).numpy()
        return theta, x, y + noise * rng.normal(size=y.shape)


def delta_r2(model, device, centre, theta, x):
    c = torch.tensor(centre).expand(len(x), -1)
    with torch.no_grad():
        truth = (device(torch.tensor(theta), torch.tensor(x)) - device(c, torch.tensor(x))).numpy()
        pred = (model.predict(theta, x) - model.predict(centre, x)).double().numpy()
    return 1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()


def gradient_cosine(model, device, centre, x, target):
    grads = []
    for f in (lambda t: device(t, torch.tensor(x)), lambda t: model.predict(t, x).double()):
        t = torch.tensor(centre, requires_grad=True)
        grads.append(torch.autograd.grad(((f(t) - target) ** 2).mean(), t)[0])
    return float(torch.nn.functional.cosine_similarity(*grads, dim=0))


@pytest.fixture(scope="module")
def setup():
    device = RingBank()
    rng = np.random.default_rng(1)
    centre = rng.uniform(0.3, 0.7, N_PARAMS)
    design = design_settings(
        centre, 0.05, 1000, device.low, device.high, global_fraction=0.0, seed=2
    )
    train = device.measure(design.settings, 64, rng)
    test_settings = design_settings(
        centre, 0.05, 50, device.low, device.high, global_fraction=0.0, seed=3
    ).settings
    test = device.measure(test_settings, 64, rng)[:2]
    return device, centre, train, test


def test_hyper_surrogate_quality_at_1000_settings(setup):
    """Issue targets: R^2 >= 0.95 and cosine >= 0.9. Measured 0.975 and 0.998."""
    device, centre, train, (theta_t, x_t) = setup
    model = make_surrogate("hyper", theta_low=device.low, theta_high=device.high, seed=0).fit(
        *train
    )
    assert delta_r2(model, device, centre, theta_t, x_t) > 0.95
    target = torch.tensor(np.random.default_rng(4).uniform(-1, 1, (64, OUT)))
    assert gradient_cosine(model, device, centre, x_t[:64], target) > 0.9


def test_warm_refit_of_100_steps_on_50k_rows_is_fast(setup):
    """Budget: < 5 s on 2 cores. Measured about 1 s (one thread, shared machine)."""
    device, centre, (theta, x, y), _ = setup
    model = make_surrogate(
        "hyper", theta_low=device.low, theta_high=device.high, max_steps=20, seed=0
    )
    model.fit(theta[:6400], x[:6400], y[:6400])
    rows = slice(0, 50_000)
    best = np.inf
    for _ in range(2):  # the first call pays one-time allocation
        t0 = time.perf_counter()
        model.update(theta[rows], x[rows], y[rows], centre=centre)
        best = min(best, time.perf_counter() - t0)
    assert model.last_report.steps == 100
    assert best < 5.0, best


def test_loss_gradient_through_predict_is_fast(setup):
    """Measured about 2 ms for theta (160,) and x (128, 16)."""
    device, centre, train, (_theta_t, x_t) = setup
    model = make_surrogate("hyper", theta_low=device.low, theta_high=device.high, max_steps=10).fit(
        train[0][:6400], train[1][:6400], train[2][:6400]
    )
    x = torch.tensor(x_t[:128])
    t0 = time.perf_counter()
    for _ in range(20):
        t = torch.tensor(centre, requires_grad=True)
        torch.autograd.grad(((model.predict(t, x) - 1) ** 2).mean(), t)
    assert (time.perf_counter() - t0) / 20 < 0.05
