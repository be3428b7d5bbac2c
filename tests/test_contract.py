"""The device contract: validation of members, queries and outputs; metering and replay."""

import numpy as np
import pytest

from blackbox_sat.devices.contract import DeviceContractError, DeviceOutputError, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.metered import BudgetExhausted, MeteredDevice


class Toy:
    n_params, in_dim, out_dim = 3, 2, 4
    bounds = (np.zeros(3), np.array([1.0, 1.0, 2 * np.pi]))
    periodic = np.array([False, False, True])
    max_batch = 5

    def __init__(self, bad=None):
        self.bad, self.calls = bad, 0

    def query(self, theta, x):
        self.calls += 1
        y = np.tanh(x @ np.ones((2, 4)) * theta.sum())
        if self.bad == "nan":
            y[0, 0] = np.nan
        if self.bad == "shape":
            y = y[:, :3]
        if self.bad == "raise":
            raise OSError("instrument timeout")
        return y


def test_describe_defaults_and_start():
    info = describe(Toy())
    assert (
        info.in_dim == 2 and info.max_batch == 5 and info.periodic.tolist() == [False, False, True]
    )
    assert np.allclose(info.scale, [1, 1, 2 * np.pi])
    t0 = info.start(0)
    assert np.allclose(t0, [0.5, 0.5, np.pi], atol=0.1) and np.array_equal(t0, info.start(0))
    assert not np.array_equal(t0, info.start(1))
    assert np.allclose(info.project([2.0, -1.0, 2 * np.pi + 0.5]), [1.0, 0.0, 0.5])


def test_missing_member_named():
    class NoOut:
        n_params, in_dim = 2, 2

        def query(self, t, x):
            return x

    with pytest.raises(DeviceContractError, match="out_dim"):
        describe(NoOut())


@pytest.mark.parametrize(
    "theta,msg",
    [
        (np.zeros(4), r"shape \(n_params,\) = \(3,\)"),
        (np.array([0.1, np.nan, 0.1]), "non-finite"),
        (np.array([0.1, 1.5, 0.1]), "outside bounds"),
        (np.array(["a", "b", "c"]), "dtype"),
    ],
)
def test_bad_theta_rejected_before_device(theta, msg):
    dev = Toy()
    with pytest.raises(DeviceContractError, match=msg):
        MeteredDevice(dev).query(theta, np.zeros((2, 2)))
    assert dev.calls == 0


@pytest.mark.parametrize(
    "x,msg",
    [
        (np.zeros((2, 3)), r"\(batch, in_dim\)"),
        (np.full((2, 2), np.inf), "non-finite"),
        (np.full((2, 2), 3.0), "input_bounds"),
        (np.zeros(2), "batch"),
    ],
)
def test_bad_inputs_rejected(x, msg):
    dev = Toy()
    with pytest.raises(DeviceContractError, match=msg):
        MeteredDevice(dev).query(np.full(3, 0.5), x)
    assert dev.calls == 0


@pytest.mark.parametrize(
    "bad,msg",
    [("nan", "non-finite"), ("shape", r"shape \(2, 3\)"), ("raise", "instrument timeout")],
)
def test_bad_device_output_reported_and_logged(tmp_path, bad, msg):
    with Ledger(tmp_path / "l.sqlite") as led:
        meter = MeteredDevice(Toy(bad), led)
        with pytest.raises(DeviceOutputError, match=msg):
            meter.query(np.full(3, 0.5), np.zeros((2, 2)))
        rows = list(led.rows())
        assert len(rows) == 1 and not rows[0].ok and rows[0].y is None and meter.settings_used == 1


def test_batches_split_and_budget(tmp_path):
    dev = Toy()
    meter = MeteredDevice(dev, budget=4)
    y = meter.query(np.full(3, 0.5), np.zeros((12, 2)))  # max_batch 5 -> 3 settings
    assert (
        y.shape == (12, 4)
        and dev.calls == 3
        and meter.settings_used == 3
        and meter.samples_used == 12
    )
    meter.query(np.full(3, 0.5), np.zeros((20, 2)), purpose="eval")  # eval is not charged
    assert meter.settings_used == 3 and meter.eval_settings == 4
    with pytest.raises(BudgetExhausted):
        meter.query(np.full(3, 0.5), np.zeros((6, 2)))
    assert dev.calls == 7


def test_replay_serves_logged_queries_without_paying_again(tmp_path):
    rng = np.random.default_rng(0)
    thetas = rng.uniform(0, 1, (6, 3))
    x = rng.uniform(-1, 1, (4, 2))
    with Ledger(tmp_path / "l.sqlite") as led:
        first = MeteredDevice(Toy(), led)
        ys = [first.query(t, x) for t in thetas[:4]]  # the run is killed after 4 queries
    with Ledger(tmp_path / "l.sqlite") as led:
        dev = Toy()
        again = MeteredDevice(dev, led)
        ys2 = [again.query(t, x) for t in thetas]
        assert dev.calls == 2 and again.replayed == 4 and again.settings_used == 6
        assert all(np.array_equal(a, b) for a, b in zip(ys, ys2))
        assert led.counts()["settings"] == 6
