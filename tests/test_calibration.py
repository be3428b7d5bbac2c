"""Grey-box calibration: the simulators' calibration models and the ``calibrated`` surrogate
family (surrogates/calibrated.py).

Identification is checked on noise-free data (``noise=0``, no programming noise, no DAC), so
the fit should reach rounding-level errors; thresholds are loose against that but far below
the datasheet's errors (which are 0.1-0.5 output spreads and 0.15 in the mzi parameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_sat.sim import freespace, mrr, mzi
from blackbox_sat.sim.calibration import parameter_rms
from blackbox_sat.sim.mzi import MeshCalibrationModel
from surrogates import CalibratedSurrogate, Surrogate, load_surrogate, make_surrogate

from .conftest import assert_meets_protocol

QUIET = {"noise": 0.0, "programming_noise": 0.0, "dac_bits": None}


def _rows(dev, n_settings, batch=32, seed=0, transform=None):
    """Random settings over the whole bounds, ``batch`` random inputs each, noise-free outputs."""
    rng = np.random.default_rng(seed)
    lo, hi = dev.bounds
    out = []
    for s in range(n_settings):
        th = rng.uniform(lo, hi, dev.n_params)
        x = rng.uniform(*dev.input_bounds, (batch, dev.in_dim))
        y = dev.query(th, x)
        out.append(
            (
                np.repeat(th[None], batch, 0),
                x,
                y if transform is None else transform(y),
                np.full(batch, s),
            )
        )
    return tuple(np.concatenate(c) for c in zip(*out))


def _nrmse(pred, y, spread):
    return float(np.sqrt(np.mean(((np.asarray(pred) - y) / spread) ** 2)))


@pytest.mark.parametrize(
    "dev",
    [
        mzi(n_modes=5, drift=0.7),
        mrr(in_dim=5, out_dim=3, drift=0.4),
        freespace(
            in_dim=4, out_dim=3, rotation=0.7, shift=(0.3, -0.4), scale=1.01, nonlinearity=True
        ),
    ],
    ids=["mzi", "mrr", "freespace"],
)
def test_truth_reproduces_true_model_and_datasheet_the_nominal(dev):
    rng = np.random.default_rng(1)
    th = torch.as_tensor(rng.uniform(*dev.bounds, (3, dev.n_params)))
    x = torch.as_tensor(rng.uniform(*dev.input_bounds, (3, 6, dev.in_dim)))
    model = dev.calibration_model()
    with torch.no_grad():
        nominal = torch.stack([dev.nominal_model()(t, xx) for t, xx in zip(th, x)])
        true = torch.stack([dev.true_model()(t, xx) for t, xx in zip(th, x)])
        assert torch.allclose(model.batched(th, x), nominal, atol=1e-12)
        assert (true - nominal).abs().max() > 0.05  # the chip really differs
        model.load_truth(dev.calibration_truth())
        assert torch.allclose(model.batched(th, x), true, atol=1e-12)
        assert torch.allclose(model(th[0], x[0]), true[0], atol=1e-12)
    assert float(model.prior_loss().detach()) > 0


def test_mzi_recovers_coupler_errors_and_phase_offsets():
    """6 modes (15 MZIs, 60 unknowns), 12 settings x 32 inputs, noise-free. Threshold 1e-3 rad /
    unitless: the datasheet is 0.15 off, the read-noise-free fit reached ~1e-5 in development,
    and 1e-3 rad is below the 12-bit DAC step of a real chip (1.5 mrad)."""
    dev = mzi(n_modes=6, **QUIET)
    theta, x, y, g = _rows(dev, 12)
    sur = make_surrogate("calibrated", model=dev.calibration_model()).fit(theta, x, y, g)
    rep = sur.report
    truth = dev.calibration_truth()
    assert parameter_rms(dev.calibration_model(), truth)["all"] > 0.1
    rms = parameter_rms(sur.model, truth)
    assert rms["bs_error"] < 1e-3 and rms["phase_bias"] < 1e-3, rms
    assert rep["heldout_settings"] >= 2 and rep["datasheet_heldout_nrmse"] > 0.2
    assert rep["heldout_nrmse"] < 1e-3 and rep["r2_vs_datasheet"] > 0.999
    # Unseen settings, predicted through the surrogate interface.
    th_t, x_t, y_t, _ = _rows(dev, 4, seed=5)
    with torch.no_grad():
        assert _nrmse(sur.predict(th_t, x_t).numpy(), y_t, y.std(0)) < 1e-3


def test_mrr_calibration_lowers_heldout_error():
    """Linewidth trades with offset and heater gain (only two per-ring combinations are well
    identified), so the check is on outputs: 1 % of the spread against ~30 % for the datasheet."""
    dev = mrr(in_dim=4, out_dim=3, drift=0.3, **QUIET)
    theta, x, y, g = _rows(dev, 12)
    sur = make_surrogate("calibrated", model=dev.calibration_model()).fit(theta, x, y, g)
    rep = sur.report
    assert rep["datasheet_heldout_nrmse"] > 0.2
    assert (
        rep["heldout_nrmse"] < 0.01 and rep["heldout_nrmse"] < 0.05 * rep["datasheet_heldout_nrmse"]
    )


def test_freespace_calibration_recovers_misalignment():
    dev = freespace(in_dim=4, out_dim=3, rotation=0.6, shift=(0.3, -0.25), scale=1.01, **QUIET)
    theta, x, y, g = _rows(dev, 12)
    sur = make_surrogate("calibrated", model=dev.calibration_model()).fit(theta, x, y, g)
    rep = sur.report
    assert rep["datasheet_heldout_nrmse"] > 0.05
    assert (
        rep["heldout_nrmse"] < 0.01 and rep["heldout_nrmse"] < 0.05 * rep["datasheet_heldout_nrmse"]
    )
    rms = parameter_rms(sur.model, dev.calibration_truth())
    # Datasheet is 0.6 deg, 0.28 px, 0.01 off.
    assert rms["rotation"] < 0.05 and rms["shift"] < 0.05 and rms["scale"] < 2e-3, rms


def test_residual_corrects_an_effect_the_model_lacks():
    """Outputs saturate, ``y / (1 + y)``, which the mesh model cannot express (its detector
    gains take the mean compression only: 0.27 spreads held out); the residual brings it
    below a fifth of that, and the joint refinement pulls the parameters back towards the
    truth."""
    dev = mzi(n_modes=4, **QUIET)

    def sat(y):
        return y / (1 + y)

    theta, x, y, g = _rows(dev, 16, transform=sat)
    th_t, x_t, y_t, _ = _rows(dev, 6, seed=9, transform=sat)
    errors, params = {}, {}
    for kind in ("calibrated", "calibrated+residual"):
        sur = make_surrogate(kind, model=dev.calibration_model(), max_restarts=0, seed=0).fit(
            theta, x, y, g
        )
        with torch.no_grad():
            errors[kind] = _nrmse(sur.predict(th_t, x_t).numpy(), y_t, y.std(0))
        # The mesh's own parameters: the detector gains trade with the residual's slopes.
        truth = {k: v for k, v in dev.calibration_truth().items() if k != "gain"}
        params[kind] = parameter_rms(sur.model, truth)["all"]
    assert sur.report["residual"]["kept"]
    assert errors["calibrated"] > 0.2
    assert errors["calibrated+residual"] < 0.2 * errors["calibrated"], errors
    assert params["calibrated+residual"] < params["calibrated"], params


def test_residual_stays_off_when_the_model_is_right():
    dev = mzi(n_modes=4, **QUIET)
    theta, x, y, g = _rows(dev, 10)
    sur = make_surrogate(
        "calibrated+residual", model=dev.calibration_model(), residual_steps=300
    ).fit(theta, x, y, g)
    res = sur.report["residual"]
    assert res["heldout_nrmse_without"] < 1e-3
    # Either dropped by the held-out gate, or kept while no worse.
    assert not res["kept"] or res["heldout_nrmse"] <= res["heldout_nrmse_without"]


class _GainModel(nn.Module):
    """A user model with no batched path: ``y = gain * (x @ A(theta))``, unknown ``gain``."""

    def __init__(self, out_dim=3):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(out_dim, dtype=torch.float64))

    def forward(self, theta, x):
        a = torch.stack([torch.cos(theta), torch.sin(theta), theta**2], 1)  # (in, out)
        return self.gain * (x.to(theta.dtype) @ a)


def test_generic_model_is_vectorised_with_vmap_and_identified():
    true = _GainModel()
    with torch.no_grad():
        true.gain.copy_(torch.tensor([0.8, 1.3, 0.95]))
    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        th = rng.uniform(-1, 1, 2)
        x = rng.uniform(-1, 1, (16, 2))
        with torch.no_grad():
            y = true(torch.as_tensor(th), torch.as_tensor(x)).numpy()
        rows.append((np.repeat(th[None], 16, 0), x, y, np.full(16, s)))
    theta, x, y, g = (np.concatenate(c) for c in zip(*rows))
    sur = CalibratedSurrogate(_GainModel()).fit(theta, x, y, g)
    assert np.allclose(sur.identified()["gain"], [0.8, 1.3, 0.95], atol=1e-4)
    assert sur._call.use_vmap


def test_protocol_predict_grouping_gradients_and_save_load(tmp_path):
    dev = mzi(n_modes=4, **QUIET)
    theta, x, y, g = _rows(dev, 8)
    sur = make_surrogate("calibrated", model=dev.calibration_model(), max_iter=100).fit(
        theta, x, y, g
    )
    assert_meets_protocol(sur, Surrogate)
    assert (sur.n_params, sur.in_dim, sur.out_dim) == (theta.shape[1], x.shape[1], y.shape[1])
    # Rows of mixed settings equal per-setting predictions.
    rows = np.array([0, 40, 1, 200, 41, 2])
    mixed = sur.predict(theta[rows], x[rows])
    single = torch.cat([sur.predict(theta[r], x[r : r + 1]) for r in rows])
    assert torch.allclose(mixed, single, atol=1e-12)
    # Differentiable in theta, and close to the chip's own gradient.
    th = torch.as_tensor(theta[0], dtype=torch.float64).requires_grad_(True)
    sur.predict(th, x[:8]).sum().backward()
    th_true = torch.as_tensor(theta[0]).requires_grad_(True)
    dev.true_model()(th_true, torch.as_tensor(x[:8])).sum().backward()
    assert torch.allclose(th.grad, th_true.grad, atol=1e-2)
    # Save / load into a fresh model.
    path = tmp_path / "cal.pt"
    sur.save(path)
    back = CalibratedSurrogate.load(path, model=dev.calibration_model())
    assert torch.equal(back.predict(theta[:9], x[:9]), sur.predict(theta[:9], x[:9]))
    with pytest.raises(TypeError, match="model="):
        load_surrogate(path)
    # Warm update on new settings keeps it calibrated.
    th2, x2, y2, g2 = _rows(dev, 3, seed=3)
    sur.update(th2, x2, y2, g2, steps=10, append=True)
    assert sur.report["updates"][-1]["train_nrmse"] < 1e-3


class _NoParams(nn.Module):
    def forward(self, theta, x):
        return x


class _WrongShape(_GainModel):
    def forward(self, theta, x):
        return super().forward(theta, x)[:, :2]


class _NaN(_GainModel):
    def forward(self, theta, x):
        return super().forward(theta, x) * torch.tensor(float("nan"), dtype=torch.float64)


def test_bad_models_raise_errors_that_name_the_problem():
    rng = np.random.default_rng(0)
    theta = np.repeat(rng.uniform(-1, 1, (4, 2)), 5, 0)
    x, y = rng.uniform(-1, 1, (20, 2)), rng.uniform(-1, 1, (20, 3))
    with pytest.raises(ValueError, match="no nn.Parameter"):
        CalibratedSurrogate(_NoParams())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        CalibratedSurrogate(lambda theta, x: x)
    with pytest.raises(TypeError, match="needs model="):
        make_surrogate("calibrated")
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\).*expected \(4, 3\)"):
        CalibratedSurrogate(_WrongShape()).fit(theta, x, y)
    with pytest.raises(ValueError, match="non-finite"):
        CalibratedSurrogate(_NaN()).fit(theta, x, y)
    with pytest.raises(ValueError, match="different theta"):
        CalibratedSurrogate(_GainModel()).fit(theta, x, y, groups=np.zeros(20, int))


def test_mesh_model_batched_matches_forward_under_float32():
    model = MeshCalibrationModel(5, 0.02)
    th = torch.rand(3, 20, dtype=torch.float32) * 6
    x = torch.rand(3, 4, 5, dtype=torch.float32)
    y = model.batched(th, x)
    assert y.dtype == torch.float32
    assert torch.allclose(y[1], model(th[1], x[1]))


def test_stalled_fit_restarts_from_perturbed_datasheet():
    """Free-space geometry has local minima: from the identity warp this chip's fit stalls at
    about 3x the noise floor (estimated from repeated inputs). The stall is recorded and a
    restart from a perturbed datasheet reaches the floor and the true misalignment."""
    dev = freespace(in_dim=16, out_dim=5, rotation=1.0, shift=0.5, scale=1.01)  # default read noise
    rng = np.random.default_rng(0)
    rows = []
    for s in range(10):
        th = rng.uniform(*dev.bounds, dev.n_params)
        x = rng.uniform(0, 1, (64, dev.in_dim))
        x = np.concatenate([x, x[:8]])  # 8 repeats: the noise floor
        rows.append((np.repeat(th[None], len(x), 0), x, dev.query(th, x), np.full(len(x), s)))
    theta, x, y, g = (np.concatenate(c) for c in zip(*rows))
    sur = make_surrogate("calibrated", model=dev.calibration_model()).fit(theta, x, y, g)
    rep = sur.report
    assert rep["noise_source"] == "repeats" and 0.03 < rep["noise_nrmse"] < 0.2
    first, last = rep["attempts"][0], rep["attempts"][-1]
    assert first["stalled"] and first["train_nrmse"] > rep["stall_threshold"]
    assert rep["restarts"] >= 1 and not last["stalled"] and last["start"].startswith("perturbed")
    assert all(np.isfinite(a["heldout_nrmse"]) for a in rep["attempts"])
    assert rep["heldout_nrmse"] < 1.5 * rep["noise_nrmse"]
    rms = parameter_rms(sur.model, dev.calibration_truth())
    assert rms["rotation"] < 0.05 and rms["shift"] < 0.05, rms


def test_mzi_crosstalk_can_be_a_parameter():
    """A design whose crosstalk is not trusted: the datasheet says 0.02, the chip has 0.04."""
    dev = mzi(n_modes=5, crosstalk=0.04, **QUIET)
    model = dev.calibration_model(fit_crosstalk=True)
    th, x = (
        torch.rand(2, dev.n_params, dtype=torch.float64) * 6,
        torch.rand(2, 4, 5, dtype=torch.float64),
    )
    with torch.no_grad():
        model.load_truth(dev.calibration_truth(fit_crosstalk=True))
        true = torch.stack([dev.true_model()(t, xx) for t, xx in zip(th, x)])
        assert torch.allclose(model.batched(th, x), true, atol=1e-12)
    theta, x, y, g = _rows(dev, 10)
    fixed = make_surrogate(
        "calibrated", model=dev.calibration_model(crosstalk=0.02), max_restarts=0
    ).fit(theta, x, y, g)
    free = make_surrogate(
        "calibrated", model=dev.calibration_model(fit_crosstalk=True, crosstalk=0.02)
    ).fit(theta, x, y, g)
    assert abs(float(free.model.kappa.detach()) - 0.04) < 1e-3
    assert free.report["heldout_nrmse"] < 0.01 < fixed.report["heldout_nrmse"]


def test_output_gain_absorbs_arm_loss():
    """Unequal arm loss (0.5 dB per shifter) dims every output; a unitary mesh model cannot
    follow (held-out error near the datasheet's), the per-detector gain takes most of it."""
    dev = mzi(n_modes=6, arm_loss=0.5, **QUIET)
    theta, x, y, g = _rows(dev, 12)
    err = {}
    for gain in (False, True):
        model = dev.calibration_model(output_gain=gain)
        sur = make_surrogate("calibrated", model=model, max_restarts=0).fit(theta, x, y, g)
        err[gain] = sur.report["heldout_nrmse"]
    assert sur.identified()["gain"].max() < 0.9  # the light lost shows as gain below 1
    assert err[True] < 0.5 * err[False], err


def test_monotone_map_starts_at_identity_and_stays_increasing():
    from surrogates.calibration_model import MonotoneMap

    y = torch.randn(200, 3, dtype=torch.float64)
    m = MonotoneMap.from_outputs(y)
    assert torch.allclose(m(y, None), torch.zeros_like(y), atol=1e-12)
    with torch.no_grad():
        m.log_slope.normal_(0, 2)
        m.shift.normal_()
    u = torch.linspace(-6, 6, 500, dtype=torch.float64)[:, None].expand(-1, 3)
    f = m(u, None) + u
    assert (f[1:] - f[:-1]).min() > 0


def test_monotone_residual_lowers_heldout_error_under_saturation(tmp_path):
    """Detector compression ``P / (1 + P / 0.25)`` is a monotone map of each output, the form
    of the default residual: kept by the held-out gate, it cuts the held-out error well below
    the calibrated model's; saved and reloaded, it predicts the same."""
    dev = mzi(n_modes=4, saturation=0.25, **QUIET)
    theta, x, y, g = _rows(dev, 12)
    plain = make_surrogate("calibrated", model=dev.calibration_model(), max_restarts=0).fit(
        theta, x, y, g
    )
    sur = make_surrogate(
        "calibrated+residual", model=dev.calibration_model(), max_restarts=0, seed=0
    ).fit(theta, x, y, g)
    res = sur.report["residual"]
    assert res["kept"] and sur.residual_form == "monotone"
    assert res["heldout_nrmse"] < 0.5 * plain.report["heldout_nrmse"], res
    path = tmp_path / "cal.pt"
    sur.save(path)
    back = CalibratedSurrogate.load(path, model=dev.calibration_model())
    assert torch.equal(back.predict(theta[:9], x[:9]), sur.predict(theta[:9], x[:9]))
    mlp = make_surrogate(
        "calibrated+residual",
        model=dev.calibration_model(),
        residual_form="mlp",
        residual_gate=False,
        residual_steps=50,
        max_restarts=0,
    ).fit(theta, x, y, g)
    for fitted in (sur, mlp):  # each form reloads as the class it was saved with
        fitted.save(tmp_path / "res.pt")
        back = CalibratedSurrogate.load(tmp_path / "res.pt", model=dev.calibration_model())
        assert type(back.net) is type(fitted.net)
