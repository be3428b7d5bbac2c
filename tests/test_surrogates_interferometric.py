"""The interferometric family on a synthetic interferometer written here (not the package's
simulators): it fits near a centre, re-centring is exact, and re-centring plus a warm refit
follows a moved centre where the stale model and the non-re-centred refit do not."""

import numpy as np
import pytest
import torch

from surrogates import InterferometricSurrogate, load_surrogate, make_surrogate
from surrogates.design import trust_region
from surrogates.interferometric import InterferometricStructure, quadratic_readout, readout_matrices

N_MODES = 4


class ToyMesh:
    """A rectangular mesh of 2x2 interferometers: coupler, phase, coupler, phase on neighbouring
    modes, with coupler splitting errors and phase offsets; outputs are intensities."""

    def __init__(self, n_modes=N_MODES, seed=0, sigma=0.1):
        rng = np.random.default_rng(seed)
        self.n = n_modes
        self.pairs = [
            (i, i + 1) for layer in range(n_modes) for i in range(layer % 2, n_modes - 1, 2)
        ]
        self.n_params = 2 * len(self.pairs)
        self.err = rng.normal(0, sigma, (len(self.pairs), 2))
        self.offset = rng.normal(0, 0.2, self.n_params)
        self.low, self.high = np.zeros(self.n_params), np.full(self.n_params, 2 * np.pi)

    def transfer(self, theta):
        """``(..., n_params) -> (..., n, n)`` complex transfer matrices."""
        th = torch.as_tensor(theta, dtype=torch.float64) + torch.as_tensor(self.offset)
        u = torch.eye(self.n, dtype=torch.complex128).expand(*th.shape[:-1], self.n, self.n).clone()
        for k, (a, b) in enumerate(self.pairs):
            for s in range(2):
                t, c = np.sqrt((1 + self.err[k, s]) / 2), np.sqrt((1 - self.err[k, s]) / 2)
                ra = (
                    u[..., a, :]
                    * torch.polar(torch.ones_like(th[..., 2 * k + s]), th[..., 2 * k + s])[
                        ..., None
                    ]
                )
                rb = u[..., b, :].clone()
                u[..., a, :], u[..., b, :] = t * ra + 1j * c * rb, 1j * c * ra + t * rb
        return u

    def __call__(self, theta, x):
        """Noise-free intensities ``(m, n)`` for ``theta (m, P)`` and real fields ``x (m, n)``."""
        field = torch.einsum(
            "mij,mj->mi", self.transfer(theta), torch.as_tensor(x, dtype=torch.complex128)
        )
        return (field.abs() ** 2).numpy()


def measure(mesh, centre, radius, n_settings, per_setting, rng, noise=1e-3):
    settings = trust_region(centre, radius, n_settings, mesh.low, mesh.high, periodic=True, rng=rng)
    theta = np.repeat(settings, per_setting, axis=0)
    x = rng.uniform(0, 1, (len(theta), mesh.n))
    return theta, x, mesh(theta, x) + noise * rng.normal(size=(len(theta), mesh.n))


def delta_r2(model, mesh, centre, theta, x):
    """Held-out R^2 of ``y(theta, x) - y(centre, x)`` (noise free)."""
    truth = mesh(theta, x) - mesh(np.broadcast_to(centre, theta.shape).copy(), x)
    with torch.no_grad():
        pred = (model.predict(theta, x) - model.predict(centre, x)).double().numpy()
    return 1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()


RADIUS = 0.03  # bound widths: +-0.19 rad per phase
MOVE = 0.1  # bound widths per phase, about 3 trust-region radii


@pytest.fixture(scope="module")
def problem():
    mesh = ToyMesh()
    rng = np.random.default_rng(0)
    c0 = rng.uniform(0, 2 * np.pi, mesh.n_params)
    c1 = np.mod(c0 + MOVE * 2 * np.pi * rng.choice([-1, 1], mesh.n_params), 2 * np.pi)
    train0 = measure(mesh, c0, RADIUS, 150, 16, rng)
    train1 = measure(mesh, c1, RADIUS, 150, 16, rng)
    test0 = measure(mesh, c0, RADIUS, 40, 16, rng)[:2]
    test1 = measure(mesh, c1, RADIUS, 40, 16, rng)[:2]
    model = make_surrogate(
        "interferometric",
        theta_low=mesh.low,
        theta_high=mesh.high,
        periodic=True,
        max_steps=1500,
        seed=0,
    ).fit(*train0)
    return mesh, c0, c1, train1, test0, test1, model


def test_fits_near_the_centre(problem):
    mesh, c0, _, _, test0, _, model = problem
    np.testing.assert_allclose(model.centre, c0, atol=0.05)  # the data's circular mean
    assert delta_r2(model, mesh, c0, *test0) > 0.85  # measured 0.93-0.95 over three seeds


def test_recentre_is_exact():
    mesh = ToyMesh(seed=1)
    rng = np.random.default_rng(1)
    theta, x, y = measure(mesh, np.full(mesh.n_params, 1.0), 0.05, 20, 8, rng)
    model = InterferometricSurrogate(
        theta_low=mesh.low, theta_high=mesh.high, periodic=True, max_steps=20, dtype="float64"
    ).fit(theta, x, y)
    before = model.predict(theta, x)
    model.recentre(np.full(mesh.n_params, 4.0))
    np.testing.assert_allclose(model.centre, 4.0)
    torch.testing.assert_close(model.predict(theta, x), before, rtol=1e-10, atol=1e-10)


def test_recentre_and_update_follow_a_moved_centre(problem):
    mesh, c0, c1, train1, _, test1, model = problem
    stale = delta_r2(model, mesh, c1, *test1)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}

    model.update(*train1, centre=c1, steps=300)
    moved = delta_r2(model, mesh, c1, *test1)
    np.testing.assert_allclose(model.centre, c1, atol=1e-5)

    # the same refit, keeping the expansion at the old centre
    model.model.load_state_dict(state)
    model._optimizer = None
    model.update(*train1, centre=c0, steps=300)
    not_recentred = delta_r2(model, mesh, c1, *test1)

    # measured over three seeds: stale -0.36..0.46, not re-centred 0.51..0.83, re-centred
    # 0.90..0.94 (this fixture: -0.36, 0.51, 0.91)
    assert moved > 0.85, (stale, not_recentred, moved)
    assert moved > not_recentred + 0.05 and moved > stale + 0.3, (stale, not_recentred, moved)


def test_update_without_centre_recentres_on_the_data():
    mesh = ToyMesh(seed=2)
    rng = np.random.default_rng(2)
    model = InterferometricSurrogate(
        theta_low=mesh.low, theta_high=mesh.high, periodic=True, max_steps=10
    )
    model.fit(*measure(mesh, np.full(mesh.n_params, 1.0), 0.02, 10, 4, rng))
    model.update(*measure(mesh, np.full(mesh.n_params, 6.2), 0.02, 10, 4, rng), steps=5)
    # circular mean: 6.2 rad, not a linear mean dragged towards pi
    np.testing.assert_allclose(model.centre, 6.2, atol=0.05)


def test_local_radius_restricts_training_rows():
    mesh = ToyMesh(seed=3)
    rng = np.random.default_rng(3)
    near = measure(mesh, np.full(mesh.n_params, 1.0), 0.02, 10, 4, rng)
    far = measure(mesh, np.full(mesh.n_params, 3.0), 0.02, 10, 4, rng)
    model = InterferometricSurrogate(
        theta_low=mesh.low, theta_high=mesh.high, periodic=True, max_steps=10, local_radius=0.05
    )
    model.fit(*near)
    model.update(*far, append=True, centre=np.full(mesh.n_params, 1.0), steps=5)
    assert len(model.data) == 80 and len(model.training_data()) == 40


def test_non_periodic_parameters_and_linear_readout():
    mesh = ToyMesh(seed=4)
    rng = np.random.default_rng(4)
    theta, x, y = measure(mesh, np.full(mesh.n_params, 2.0), 0.05, 30, 8, rng)
    model = InterferometricSurrogate(output="linear", n_modes=6, max_steps=50).fit(
        theta, x, y[:, :3]
    )
    assert model.predict(theta[:5], x[:5]).shape == (5, 3)
    assert model.model.log_rate.requires_grad is False  # frozen outside training
    assert torch.all(model.model.rate() != torch.pi)  # learned rates without periodic


class UnitPowerMesh(ToyMesh):
    """The same mesh fed by a source of fixed power: the inputs set only how it is split,
    so the field is ``x / |x|`` (as on a chip whose modulators divide one laser)."""

    def __call__(self, theta, x):
        x = np.asarray(x)
        return super().__call__(theta, x / np.linalg.norm(x, axis=1, keepdims=True))


def test_input_power_is_chosen_from_the_data(tmp_path):
    def fitted(mesh, input_power):
        rng = np.random.default_rng(0)
        centre = rng.uniform(0, 2 * np.pi, mesh.n_params)

        def draw(n):
            settings = trust_region(centre, RADIUS, n, mesh.low, mesh.high, periodic=True, rng=rng)
            theta = np.repeat(settings, 16, axis=0)
            x = rng.uniform(-1, 1, (len(theta), mesh.n))
            return theta, x, mesh(theta, x) + 1e-3 * rng.normal(size=(len(theta), mesh.n))

        train, test = draw(150), draw(40)[:2]
        model = make_surrogate(
            "interferometric",
            theta_low=mesh.low,
            theta_high=mesh.high,
            periodic=True,
            max_steps=1500,
            seed=0,
            input_power=input_power,
        ).fit(*train)
        return model, delta_r2(model, mesh, centre, *test)

    auto, r2_auto = fitted(UnitPowerMesh(), "auto")
    _, r2_free = fitted(UnitPowerMesh(), "free")
    assert bool(auto.model.unit_power) and auto.readout_r2["fixed"] > auto.readout_r2["free"]
    # measured (seeds 0-2): 0.85-0.87 against 0.51-0.58 with the inputs taken as the field
    assert r2_auto > 0.8 and r2_auto > r2_free + 0.2, (r2_auto, r2_free)
    plain, _ = fitted(ToyMesh(), "auto")
    assert not bool(plain.model.unit_power)
    auto.save(tmp_path / "s.pt")  # the choice travels with the model
    loaded = load_surrogate(tmp_path / "s.pt")
    theta, x = (
        np.zeros((3, auto.n_params)),
        np.random.default_rng(1).uniform(-1, 1, (3, auto.in_dim)),
    )
    assert bool(loaded.model.unit_power)
    torch.testing.assert_close(loaded.predict(theta, x), auto.predict(theta, x))
    with pytest.raises(ValueError, match="input_power"):
        InterferometricSurrogate(input_power="unit")


@pytest.mark.parametrize("mesh_class", [ToyMesh, UnitPowerMesh])
def test_the_convex_readout_fit_starts_U0_at_the_measured_transfer(mesh_class):
    """At the centre every shifter's update vanishes, so the readout start alone must
    reproduce the outputs: ``U0``'s rows from the top eigenpairs of the fitted ``A_k``."""
    mesh = mesh_class(seed=4)
    rng = np.random.default_rng(4)
    centre = rng.uniform(0, 2 * np.pi, mesh.n_params)
    x = rng.uniform(-1, 1, (600, mesh.n))
    y = mesh(np.broadcast_to(centre, (len(x), mesh.n_params)), x)
    unit = mesh_class is UnitPowerMesh
    xt, yt = torch.as_tensor(x), torch.as_tensor((y - y.mean(0)) / y.std(0))
    w, r2 = quadratic_readout(xt, yt, unit_power=unit)
    assert r2 > 0.999 and quadratic_readout(xt, yt, unit_power=not unit)[1] < 0.99
    a, c = readout_matrices(w, mesh.n, unit)
    structure = InterferometricStructure(
        1, mesh.n_params, mesh.n, mesh.n, np.ones(mesh.n_params, bool)
    ).double()
    structure.unit_power.fill_(unit)
    structure.init_readout(a, c)
    pred = structure(torch.zeros(1, 1, mesh.n_params, dtype=torch.float64), xt[None])[0]
    assert 1 - ((pred - yt) ** 2).sum() / (yt**2).sum() > 0.999


def test_the_readout_fit_is_skipped_for_many_inputs():
    from surrogates.interferometric import QUADRATIC_MAX_INPUTS

    rng = np.random.default_rng(5)
    d = QUADRATIC_MAX_INPUTS + 1
    theta, x, y = (
        rng.uniform(0, 1, (64, 3)),
        rng.uniform(-1, 1, (64, d)),
        rng.uniform(0, 1, (64, 2)),
    )
    for power, unit in (("auto", False), ("fixed", True)):
        model = InterferometricSurrogate(periodic=True, max_steps=2, input_power=power).fit(
            theta, x, y
        )
        assert model.readout_r2 == {} and bool(model.model.unit_power) is unit


def test_a_model_saved_before_the_input_power_test_still_loads():
    structure = InterferometricStructure(2, 3, 4, 4, np.ones(3, bool))
    state = {k: v for k, v in structure.state_dict().items() if k != "unit_power"}
    fresh = InterferometricStructure(2, 3, 4, 4, np.ones(3, bool))
    fresh.unit_power.fill_(True)
    fresh.load_state_dict(state)
    assert not bool(fresh.unit_power)


def test_phase_layers_hold_where_the_first_order_expansion_does_not(tmp_path):
    """In a box of 0.15 bound widths (+-0.94 rad per phase) products of updates matter: the
    layered model predicts the held-out change better than the first-order family, and it is
    global: re-centring leaves it alone, and it saves and loads."""
    mesh, rng = ToyMesh(seed=3), np.random.default_rng(3)
    c0 = rng.uniform(0, 2 * np.pi, mesh.n_params)
    train, test = measure(mesh, c0, 0.15, 200, 16, rng), measure(mesh, c0, 0.15, 40, 16, rng)[:2]
    kw = dict(theta_low=mesh.low, theta_high=mesh.high, periodic=True, seed=0, n_members=3)
    first = make_surrogate("interferometric", max_steps=1500, **kw).fit(*train)
    layers = make_surrogate("interferometric-layers", **kw).fit(*train)
    r2_first, r2_layers = delta_r2(first, mesh, c0, *test), delta_r2(layers, mesh, c0, *test)
    # Measured 0.64 against 0.44 (0.92 against 0.86 in a box of 0.05).
    assert r2_layers > 0.55 and r2_layers > r2_first + 0.1, (r2_layers, r2_first)
    origin = layers.model.centre.clone()
    layers.update(*train, steps=1, centre=c0 + 0.3)  # a moved centre moves no origin
    torch.testing.assert_close(layers.model.centre, origin, rtol=0, atol=0)
    assert delta_r2(layers, mesh, c0, *test) > r2_layers - 0.05
    layers.save(tmp_path / "layers.pt")
    loaded = load_surrogate(tmp_path / "layers.pt")
    assert type(loaded).__name__ == "PhaseLayerSurrogate" and loaded.model.n_layers == 8
    torch.testing.assert_close(loaded.predict(*test), layers.predict(*test))
    with pytest.raises(ValueError, match="global"):
        make_surrogate("interferometric-layers", local_radius=0.1, **kw)
