"""Every kind meets the protocol: registry, shapes, save/load round trips."""

import numpy as np
import pytest
import torch

import surrogates
from surrogates import (
    EnsembleSurrogate,
    GPSurrogate,
    InterferometricSurrogate,
    Surrogate,
    SurrogateBase,
    load_surrogate,
    make_surrogate,
    register_surrogate,
    surrogate_kinds,
)
from surrogates.dataset import groups_from_theta

from .conftest import assert_meets_protocol

P, IN, OUT = 3, 3, 2

# Small, fast configurations of every kind; the round trip must hold for each.
KINDS = {
    "hyper": {"max_steps": 20},
    "hyper-additive": {"max_steps": 20},
    "mlp": {"max_steps": 20},
    "interferometric": {"max_steps": 20, "periodic": True},
    "interferometric-layers": {"max_steps": 20, "periodic": True, "n_layers": 2},
    "gp": {"fit_steps": 10},
    "gp-variational": {"fit_steps": 10, "method": "variational", "num_inducing": 16},
    "gp-lmc": {"fit_steps": 10, "multitask": "lmc", "num_inducing": 16, "n_latents": 2},
}


def _make(name):
    kind = name if name in surrogate_kinds() else name.split("-")[0]
    return make_surrogate(kind, seed=0, **KINDS[name])


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    theta = np.repeat(rng.uniform(0, 2 * np.pi, (25, P)), 8, axis=0)
    x = rng.uniform(0, 1, (len(theta), IN))
    y = np.stack(
        [np.cos(theta[:, 0] - theta[:, 1]) * x[:, 0] + x[:, 1] ** 2, np.sin(theta[:, 2]) * x[:, 2]],
        axis=1,
    )
    return theta, x, y


def test_registry():
    assert surrogate_kinds() == [
        "calibrated",
        "calibrated+residual",
        "gp",
        "hyper",
        "hyper-additive",
        "interferometric",
        "interferometric-layers",
        "mlp",
    ]
    assert (
        isinstance(make_surrogate(), EnsembleSurrogate)
        and make_surrogate().structure_name == "hyper"
    )
    assert isinstance(make_surrogate("interferometric"), InterferometricSurrogate)
    assert isinstance(make_surrogate("interferometric-layers"), surrogates.PhaseLayerSurrogate)
    assert isinstance(make_surrogate("gp"), GPSurrogate)
    with pytest.raises(ValueError, match="unknown surrogate kind"):
        make_surrogate("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_surrogate("hyper", EnsembleSurrogate)
    assert set(surrogates.__all__) >= {
        "make_surrogate",
        "Surrogate",
        "trust_region",
        "design_settings",
        "space_filling",
        "inputs_per_setting",
        "estimate_noise",
    }


@pytest.mark.parametrize("name", sorted(KINDS))
def test_save_load_round_trip_gives_identical_predictions(name, rows, tmp_path):
    theta, x, y = rows
    model = _make(name)
    assert model.fit(theta, x, y) is model
    assert_meets_protocol(model, Surrogate)
    assert (model.n_params, model.in_dim, model.out_dim) == (P, IN, OUT)
    mean, std = model.predict_with_uncertainty(theta[:17], x[:17])
    assert mean.shape == std.shape == (17, OUT) and torch.all(std >= 0)
    model.save(tmp_path / "s.pt")
    for loader in (type(model).load, SurrogateBase.load, load_surrogate):
        loaded = loader(tmp_path / "s.pt")
        assert type(loaded) is type(model)
        assert torch.equal(loaded.predict(theta[:17], x[:17]), model.predict(theta[:17], x[:17]))
        loaded_mean, loaded_std = loaded.predict_with_uncertainty(theta[:17], x[:17])
        assert torch.equal(loaded_mean, mean) and torch.equal(loaded_std, std)
        assert torch.equal(loaded.predict(theta[0], x[:4]), model.predict(theta[0], x[:4]))
    # a loaded surrogate can be refit further
    loaded.update(theta[:80], x[:80], y[:80], steps=3)
    assert torch.all(torch.isfinite(loaded.predict(theta[:5], x[:5])))


def test_loading_as_the_wrong_class_fails(rows, tmp_path):
    model = _make("mlp").fit(*rows)
    model.save(tmp_path / "m.pt")
    with pytest.raises(TypeError):
        GPSurrogate.load(tmp_path / "m.pt")


def test_groups_default_to_identical_theta_rows(rows):
    theta = rows[0]
    groups = groups_from_theta(theta)
    assert groups.max() + 1 == 25
    np.testing.assert_array_equal(groups[::8], groups[1::8])
    model = _make("hyper")
    a = model.fit(*rows).predict(theta[:3], rows[1][:3])
    b = (
        _make("hyper")
        .fit(*rows, groups=np.repeat(np.arange(100, 125), 8))
        .predict(theta[:3], rows[1][:3])
    )
    torch.testing.assert_close(a, b)


def test_predict_accepts_tensors_and_arrays_and_broadcasts_theta(rows):
    theta, x, y = rows
    model = _make("hyper").fit(theta, x, y)
    a = model.predict(theta[0], x[:6])
    b = model.predict(np.repeat(theta[:1], 6, 0), x[:6])
    c = model.predict(torch.tensor(theta[0], dtype=torch.float32), torch.tensor(x[:6]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
