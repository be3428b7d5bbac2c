"""The twin methods (methods/twin.py): calibrate, train on the twin, deploy; ``--init-from``;
clear errors for unusable calibration models; the mzi model-form keywords."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import blackbox_sat as bs
from blackbox_sat.devices.contract import UserError
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.sim import mzi
from blackbox_sat.sim.calibration import parameter_rms
from blackbox_sat.training.calibrate import calibration_settings
from surrogates import CalibratedSurrogate

#: A 6-mode mesh (30 phases) with large static phase offsets, where the datasheet is far off.
OFFSETS: dict = {"n_modes": 6, "sigma_phase": 0.5}
FAST = {"lr_grid": [0.1], "epochs": 30, "patience": 10}


def _train(tmp_path, name, method, budget=40, device_kw=OFFSETS, **kw):
    return bs.train(
        "mzi",
        task="iris",
        method=method,
        budget=budget,
        out=tmp_path / name,
        device_kw=device_kw,
        progress=False,
        **kw,
    )


def test_twin_beats_datasheet_training_on_a_mesh_with_offsets(tmp_path):
    offline = _train(tmp_path, "offline", "offline", config=FAST)
    twin = _train(tmp_path, "twin", "twin", config=FAST)
    cal = twin["extra"]["calibration"]
    assert cal["heldout_nrmse"] < 0.2 * cal["datasheet_heldout_nrmse"], cal
    assert twin["settings_used"] <= 1 + 10  # the gain setting and the design's 10
    assert twin["accuracy"] >= offline["accuracy"] + 0.1, (twin["accuracy"], offline["accuracy"])
    assert (tmp_path / "twin" / "calibration.pt").exists()


def test_twin_sat_and_dat_stay_within_budget(tmp_path):
    ts = _train(tmp_path, "ts", "twin-sat", budget=30, config=FAST)
    assert ts["settings_used"] <= 30 and ts["extra"]["device_steps"] > 0
    assert len(ts["extra"]["recalibration_train_nrmse"]) == 2
    d = _train(tmp_path, "dat", "dat", budget=24, config={**FAST, "residual_steps": 50})
    assert d["settings_used"] <= 24 and len(d["extra"]["residual_fits"]) >= 1


def _params(path) -> dict[str, torch.Tensor]:
    sur = CalibratedSurrogate.load(path, model=mzi(**OFFSETS).calibration_model())
    return {n: p.detach().clone() for n, p in sur.model.named_parameters()}


def test_init_from_carries_theta_gain_and_calibration(tmp_path):
    first = _train(tmp_path, "a", "twin", config=FAST)
    # Zero learning rate and zero calibration iterations: what the second run returns is what
    # it started from.
    still = {"lr_grid": [0.0], "epochs": 2, "patience": 1, "max_iter": 0, "settings": 4}
    second = _train(tmp_path, "b", "twin", config=still, init_from=tmp_path / "a")
    _train(tmp_path, "c", "twin", config=still)  # the same without --init-from
    assert np.allclose(np.load(tmp_path / "b" / "theta.npy"), np.load(tmp_path / "a" / "theta.npy"))
    assert second["gain"] == first["gain"]
    assert second["extra"]["calibration"]["init"]["kept"] == "warm"  # same chip: warm fits
    with Ledger(tmp_path / "b" / "ledger.sqlite") as led:
        _, _, _, groups = led.samples()
    assert second["settings_used"] == 4 and len(np.unique(groups)) == 4  # no gain setting
    carried, old, datasheet = (_params(tmp_path / d / "calibration.pt") for d in "bac")
    for name in old:
        assert torch.allclose(carried[name], old[name])
        assert not torch.allclose(carried[name], datasheet[name])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init_from"].endswith("a")


def test_init_from_refuses_a_run_of_another_device(tmp_path):
    _train(tmp_path, "a", "twin", config=FAST)
    with pytest.raises(UserError, match="shape"):
        _train(tmp_path, "b", "twin", device_kw={"n_modes": 5}, init_from=tmp_path / "a")


class NoParameters(nn.Module):
    def forward(self, theta, x):
        return x


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, theta, x):
        return self.gain * x[:, :2]


class GivesNaN(WrongShape):
    def forward(self, theta, x):
        return self.gain * x * float("nan")


def no_parameters(device):
    return NoParameters()


def wrong_shape():
    return WrongShape()


def gives_nan(device):
    return GivesNaN()


@pytest.mark.parametrize(
    "factory, message",
    [
        ("no_parameters", "no nn.Parameter"),
        ("wrong_shape", r"expected \(4, 6\)"),
        ("gives_nan", "NaN"),
    ],
)
def test_unusable_calibration_model_is_refused_before_any_setting(tmp_path, factory, message):
    with pytest.raises(UserError, match=message):
        _train(tmp_path, "x", "twin", config={"model": f"tests.test_twin:{factory}"})
    with Ledger(tmp_path / "x" / "ledger.sqlite") as led:
        assert led.counts()["settings"] <= 1  # the readout-gain setting only


def test_device_without_calibration_model_says_what_to_pass(tmp_path):
    with pytest.raises(UserError, match="--set model=package.module:function"):
        bs.train(
            "tests.toy_devices:opaque",
            task="iris",
            method="twin-sat",
            budget=20,
            out=tmp_path / "x",
            progress=False,
        )


def test_calibration_settings_rule():
    # 480 unknowns (mzi N=16), 128 inputs x 16 outputs: the minimum of 10 settings.
    assert calibration_settings(480, 16, 128, 500) == 10
    assert calibration_settings(5144, 10, 128, 2000) == 81  # 20 values per unknown
    assert calibration_settings(5144, 10, 128, 100) == 20  # at most 20 % of the budget


def test_mzi_model_form_keywords_are_off_by_default_and_change_outputs():
    rng = np.random.default_rng(0)
    th, x = rng.uniform(0, 2 * np.pi, 30), rng.uniform(-1, 1, (8, 6))
    q = {"n_modes": 6, "noise": 0.0, "programming_noise": 0.0, "dac_bits": None}
    base = mzi(**q).query(th, x)
    assert np.array_equal(base, mzi(**q, saturation=None, arm_loss=0.0).query(th, x))
    sat = mzi(**q, saturation=0.25).query(th, x)
    assert np.allclose(sat, base / (1 + base / 0.25))
    lossy = mzi(**q, arm_loss=0.5).query(th, x)
    assert lossy.sum(1).max() < 0.99 * base.sum(1).min()  # the mesh is lossy now


def mesh6_model(device):
    """A user's calibration model given by spec (here the simulator's own, for the test)."""
    return device.calibration_model()


def test_fit_surrogate_calibrated_reports_heldout_and_parameter_errors(tmp_path):
    from blackbox_sat.harness.collect import collect, fit_surrogate

    kw = {"n_modes": 6, "noise": 0.0, "programming_noise": 0.0, "dac_bits": None}
    collect("mzi", 12, tmp_path, task="iris", inputs=32, device_kw=kw)
    rep = fit_surrogate(
        tmp_path / "ledger.sqlite",
        kind="calibrated",
        surrogate_kw={"model": "tests.test_twin:mesh6_model"},
    )
    cal = rep["calibration"]
    assert cal["heldout_nrmse"] < 0.05 * cal["datasheet_heldout_nrmse"]
    dev = mzi(**kw)
    datasheet = parameter_rms(dev.calibration_model(), dev.calibration_truth())["all"]
    # iris's 4 features on 6 modes identify the mesh less well than random inputs would
    assert cal["parameter_rms"]["all"] < 0.5 * datasheet and rep["heldout_r2_delta"] > 0.99
    assert rep["warnings"] == []


def test_fit_warning_says_what_to_change():
    from blackbox_sat.harness.collect import fit_warnings

    (line,) = fit_warnings({"kind": "gp", "heldout_r2_delta": -0.2})
    assert "-0.20" in line and "--radius" in line and "more settings" in line
    assert fit_warnings({"kind": "gp", "heldout_r2_delta": 0.9}) == []
    assert fit_warnings({"kind": "gp"}) == []  # no simulator: nothing to judge by


def test_refit_window_keeps_the_design_and_the_most_recent_settings():
    from blackbox_sat.training.calibrate import Rows

    rows = Rows()
    for i in range(10):
        rows.add(np.full(3, float(i)), np.zeros((2, 4)), np.zeros((2, 5)))
    theta, _, _, groups = rows.window(4, keep_first=2).arrays()
    assert sorted(set(theta[:, 0])) == [0.0, 1.0, 6.0, 7.0, 8.0, 9.0]
    assert len(groups) == 12 and groups.max() == 5
    assert len(rows.window(50, keep_first=2)) == 10  # a short history is kept whole
