"""The ``harmonic`` method (blackbox_sat.methods.harmonic): exact harmonic reconstruction on a
noise-free mesh, order detection on a push-pull device, reuse of the current point, budget,
non-periodic parameters, training above chance and the public ``train`` API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blackbox_sat.devices.contract import MissingCapability
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.harness.run import train
from blackbox_sat.methods import harmonic as hm
from blackbox_sat.methods.registry import get_method
from blackbox_sat.sim.mzi import mzi

from .conftest import fail_after, make_ctx
from .toy_devices import Opaque

torch.set_num_threads(1)  # tiny tensors; the test machine's cores are shared

TWO_PI = 2 * np.pi
#: Noise-free mesh. Thermal crosstalk is off too: with it a heater also moves its neighbours by
#: kappa * theta_j (wrapped), which is not a harmonic of theta_j, so the law is only approximate.
EXACT = {"noise": 0.0, "programming_noise": 0.0, "dac_bits": None, "crosstalk": 0.0}


class PushPull:
    """A mesh of fixed random unitaries in which phase ``k`` is driven push-pull, ``+theta_k``
    on one mode and ``-theta_k`` on the next, so every intensity carries a second harmonic of
    each phase (and a first one, through the third mode). Noise-free, periodic on [0, 2pi)."""

    periodic = True

    def __init__(self, n: int = 4, n_params: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_params, self.in_dim, self.out_dim = n_params, n, n
        self.bounds = (np.zeros(n_params), np.full(n_params, TWO_PI))
        z = rng.normal(size=(n_params + 1, n, n)) + 1j * rng.normal(size=(n_params + 1, n, n))
        self.u = [np.linalg.qr(m)[0] for m in z]

    def query(self, theta, x):
        u = self.u[0]
        for k, t in enumerate(theta):
            d = np.ones(self.in_dim, complex)
            d[k % self.in_dim], d[(k + 1) % self.in_dim] = np.exp(1j * t), np.exp(-1j * t)
            u = self.u[k + 1] @ (d[:, None] * u)
        return np.abs(np.asarray(x, float) @ u.T) ** 2


class HalfPeriodic:
    """``mzi`` (4 modes) declaring only its internal phases periodic (the others clip)."""

    def __init__(self, **kw):
        self.dev = mzi(seed=0, n_modes=4, **kw)
        self.n_params, self.in_dim, self.out_dim = (
            self.dev.n_params,
            self.dev.in_dim,
            self.dev.out_dim,
        )
        self.bounds, self.input_bounds = self.dev.bounds, self.dev.input_bounds
        self.periodic = np.arange(self.n_params) < self.n_params // 2

    def query(self, theta, x):
        return self.dev.query(theta, x)


def _scan(device, theta, j, phis, x):
    """Outputs ``(len(phis), B, O)`` of ``device`` with phase ``j`` set to each of ``phis``."""
    out = []
    for p in phis:
        t = np.array(theta, float)
        t[j] = p % TWO_PI
        out.append(device.query(t, x))
    return np.stack(out)


# --- the harmonic law ---------------------------------------------------------------------
@pytest.mark.parametrize("n_modes", [4, 6])
def test_first_harmonic_from_three_settings_is_exact_on_a_noise_free_mesh(n_modes):
    dev = mzi(seed=0, n_modes=n_modes, **EXACT)
    rng = np.random.default_rng(1)
    theta, x = rng.uniform(0, TWO_PI, dev.n_params), rng.uniform(-1, 1, (16, n_modes))
    held = np.array([0.3, 1.1, 2.5, 3.9, 5.6])
    for j in (0, dev.n_params // 2 - 1, dev.n_params - 1):  # internal and external phases
        phi = theta[j] + hm.offsets(1)
        coef, resid = hm.fit_harmonic(phi, _scan(dev, theta, j, phi, x), 1)
        want = _scan(dev, theta, j, held, x)
        assert coef.shape == (3, 16, n_modes) and resid == 0.0
        assert np.abs(hm.predict(coef, held) - want).max() < 1e-6 * np.abs(want).max()
        assert np.ptp(want, axis=0).max() > 0.05  # the phase does move the outputs


def test_push_pull_needs_the_second_harmonic_and_five_settings_fit_it_exactly():
    dev = PushPull()
    rng = np.random.default_rng(2)
    theta, x = rng.uniform(0, TWO_PI, dev.n_params), rng.uniform(-1, 1, (12, 4))
    held = np.array([0.4, 1.3, 2.2, 4.0, 5.1])
    want = _scan(dev, theta, 2, held, x)
    phi1 = theta[2] + hm.offsets(1)
    first, _ = hm.fit_harmonic(phi1, _scan(dev, theta, 2, phi1, x), 1)
    assert np.abs(hm.predict(first, held) - want).max() > 0.05 * np.abs(want).max()  # order 1 fails
    phi2 = theta[2] + hm.offsets(2)
    second, _ = hm.fit_harmonic(phi2, _scan(dev, theta, 2, phi2, x), 2)
    assert np.abs(hm.predict(second, held) - want).max() < 1e-9 * np.abs(want).max()


def test_sweep_detects_order_two_on_push_pull_and_keeps_order_one_on_a_mesh():
    ctx = make_ctx(PushPull(), task="iris", budget=400, method="harmonic")
    _, out = hm.harmonic_sweep(ctx, ctx.theta0, range(6), np.arange(40), checks_first=6)
    state = out["state"]
    assert out["steps"] == 6 and [j for _, j, _ in state.raised] == list(range(3))  # then default 2
    assert list(state.order[:6]) == [2] * 6 and state.default_order == 2 and not state.rough
    assert state.settings["refit"] == 6 and state.settings["fit"] == 3 * 2 + 3 * 4
    assert max(c[3] for c in state.checks if c[2] == 2) < 1e-6  # order-2 predictions exact

    ctx = make_ctx(mzi(seed=0, n_modes=4, **EXACT), task="iris", budget=400, method="harmonic")
    _, out = hm.harmonic_sweep(ctx, ctx.theta0, range(8), np.arange(40), checks_first=8)
    state = out["state"]
    assert not state.raised and state.default_order == 1 and set(state.order[:8]) == {1}
    assert max(c[3] for c in state.checks) < 1e-6


def test_sweep_reuses_the_current_point_and_steps_downhill():
    ctx = make_ctx(mzi(seed=0, n_modes=4, **EXACT), task="iris", budget=400, method="harmonic")
    idx = np.arange(60)
    theta, out = hm.harmonic_sweep(ctx, ctx.theta0, [0, 3, 5, 7, 9], idx, check_every=0)
    state = out["state"]
    # current point once, its repeat once (noise scale), then 2 new settings per step
    assert state.settings == {
        "current": 1,
        "noise": 1,
        "fit": 10,
        "check": 0,
        "refit": 0,
        "guard": 0,
    }
    y = ctx.device.query(theta, state.x, purpose="eval")
    np.testing.assert_allclose(state.y, y, atol=1e-9)  # the rebuilt outputs are the device's
    assert state.loss_trace == sorted(state.loss_trace, reverse=True)
    measured = torch.nn.functional.cross_entropy(
        ctx.pnn(torch.as_tensor(y)), torch.as_tensor(ctx.y_train[idx])
    )
    assert float(measured) == pytest.approx(
        state.loss_trace[-1], abs=1e-5
    )  # the predicted loss is real
    moved = np.flatnonzero(theta != ctx.theta0)
    assert set(moved) <= {0, 3, 5, 7, 9} and len(moved) >= 3
    _, out = hm.harmonic_sweep(ctx, theta, [1], idx, state, check_every=0)
    assert (
        state.settings["current"] == 1 and state.settings["fit"] == 12
    )  # same minibatch: no re-measure


# --- the method -----------------------------------------------------------------------------
def test_registered_as_a_device_method():
    spec = get_method("harmonic")
    assert (
        spec.needs == "device"
        and not spec.model_based
        and {k: spec.defaults[k] for k in hm.HARMONIC_DEFAULTS} == hm.HARMONIC_DEFAULTS
    )


def test_method_trains_a_small_mesh_well_above_chance_within_budget():
    ctx = make_ctx(mzi(seed=0, n_modes=6), task="iris", budget=300, method="harmonic")

    def train_loss(theta):  # on the whole training set, measured uncharged
        y = ctx.device.query(theta, ctx.device_inputs(ctx.f_train), purpose="eval")
        return float(
            torch.nn.functional.cross_entropy(
                ctx.pnn(torch.as_tensor(y)), torch.as_tensor(ctx.y_train)
            )
        )

    loss0 = train_loss(ctx.theta0)
    res = get_method("harmonic").fn(ctx)
    acc = ctx.device_accuracy(res.theta, "test", "eval")
    assert ctx.device.settings_used <= 300 and ctx.device.remaining < 5
    assert train_loss(res.theta) < loss0 - 0.3, loss0
    assert acc > 0.65  # chance is 1/3
    trace = res.extra["loss_trace"]
    assert np.mean(trace[-20:]) < np.mean(trace[:20]) - 0.2
    assert res.extra["default_order"] == 1 and not res.extra["raised"] and res.extra["checks"]
    assert len(ctx.curve) == 6 and res.extra["steps"] == len(res.extra["visited"]) > 100


def test_non_periodic_parameters_are_left_alone_and_none_periodic_is_an_error():
    ctx = make_ctx(HalfPeriodic(), task="iris", budget=60, method="harmonic")
    res = get_method("harmonic").fn(ctx)
    half = ctx.info.n_params // 2
    np.testing.assert_array_equal(res.theta[half:], ctx.theta0[half:])
    assert (
        set(res.extra["visited"]) <= set(range(half)) and res.extra["skipped_non_periodic"] == half
    )
    assert np.all((res.theta >= 0) & (res.theta < TWO_PI))
    with pytest.raises(ValueError, match="needs periodic parameters"):
        get_method("harmonic").fn(make_ctx(Opaque(), task="iris", budget=60, method="harmonic"))


def test_stops_cleanly_when_someone_else_spends_the_budget(monkeypatch):
    ctx = make_ctx(mzi(seed=0, n_modes=4), task="iris", budget=400, method="harmonic")
    fail_after(ctx, monkeypatch, 25)
    res = get_method("harmonic").fn(ctx)
    assert res.extra["steps"] >= 5 and np.all(np.isfinite(res.theta))


def test_public_train_api(tmp_path):
    result = train(
        "mzi",
        task="iris",
        method="harmonic",
        budget=120,
        seed=0,
        out=tmp_path,
        progress=False,
        device_kw={"n_modes": 6},
        config={"damping": 1.0, "damping_end": None, "refresh": 4},
    )
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.counts()["settings"] == result["settings_used"] <= 120
    ledger.close()
    assert result["accuracy"] > 0.5 and result["config"]["refresh"] == 4
    extra = result["extra"]
    assert extra["settings"]["fit"] == 2 * extra["steps"] and extra["periodic"] == 30
    with pytest.raises(MissingCapability, match="needs periodic"):  # before any folder
        train(
            "tests.toy_devices:opaque",
            task="iris",
            method="harmonic",
            budget=30,
            out=tmp_path / "opaque",
            progress=False,
        )
    assert not (tmp_path / "opaque").exists()


def test_hybrid_readout_is_trained_on_the_measured_outputs_at_no_extra_setting():
    def run(**config):
        ctx = make_ctx(
            mzi(seed=0, n_modes=6),
            task="iris",
            budget=150,
            method="harmonic",
            pnn_mode="hybrid",
            config=config,
        )
        eye = {k: v.clone() for k, v in ctx.pnn.state_dict().items()}
        res = get_method("harmonic").fn(ctx)
        y = ctx.device.query(res.theta, ctx.device_inputs(ctx.f_train), purpose="eval")
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(
                ctx.pnn(torch.as_tensor(y)), torch.as_tensor(ctx.y_train)
            )
        moved = {k for k, v in ctx.pnn.state_dict().items() if not torch.equal(v, eye[k])}
        return float(loss), moved, res.extra, ctx.device.settings_used

    loss_off, moved_off, extra_off, used_off = run(readout_lr=0.0)
    loss_on, moved_on, extra_on, used_on = run()
    assert not moved_off and extra_off["readout_steps"] == 0
    assert moved_on == {"readout.weight", "readout.bias"} and extra_on["readout_steps"] > 0
    assert used_on == used_off  # the readout costs no setting
    assert loss_on < loss_off - 0.1, (loss_on, loss_off)
