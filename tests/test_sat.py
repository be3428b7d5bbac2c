"""SAT optimizer: exact perturbation formula, base step at the perturbed gradient, projection,
and the behavioural claim (SAT ends in a flat minimum where Adam ends in a sharp one)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blackbox_sat.devices.contract import describe
from blackbox_sat.optim.sat import ASAM_ETA, SAT, Projector, projector, sat_perturbation

DT = torch.float64


def _quadratic():
    """L = 0.5 (t - b)^T A (t - b) over the concatenation t = [p1 (3,), p2 (2, 2)], A SPD."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(7, 7))
    a = m @ m.T + 7 * np.eye(7)
    b = rng.normal(size=7)
    A, B = torch.tensor(a, dtype=DT), torch.tensor(b, dtype=DT)

    def loss(p1, p2):
        t = torch.cat([p1.reshape(-1), p2.reshape(-1)]) - B
        return 0.5 * t @ A @ t

    def grad(t: np.ndarray) -> np.ndarray:
        return a @ (t - b)

    return loss, grad


def _params():
    p1 = torch.tensor([0.3, -1.2, 2.0], dtype=DT, requires_grad=True)
    p2 = torch.tensor([[0.7, -0.4], [1.5, 0.05]], dtype=DT, requires_grad=True)
    return p1, p2


SCALES = (np.array([0.5, 2.0, 4.0]), np.array([[0.25, 1.0], [3.0, 0.1]]))


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_perturbation_matches_formula(adaptive):
    loss, grad = _quadratic()
    p1, p2 = _params()
    rho = 0.37
    opt = SAT([p1, p2], torch.optim.SGD, rho=rho, adaptive=adaptive, scale=list(SCALES), lr=0.1)
    theta = np.concatenate([p1.detach().numpy().ravel(), p2.detach().numpy().ravel()])
    loss(p1, p2).backward()
    opt.first_step()
    after = np.concatenate([p1.detach().numpy().ravel(), p2.detach().numpy().ravel()])

    # Independent numpy evaluation of the documented formula.
    s = np.concatenate([x.ravel() for x in SCALES])
    g_u = grad(theta) * s
    if adaptive:
        t = np.abs(theta) / s + ASAM_ETA
        eps_u = rho * t**2 * g_u / np.linalg.norm(t * g_u)
        assert np.linalg.norm(eps_u / t) == pytest.approx(rho, rel=1e-12)
    else:
        eps_u = rho * g_u / np.linalg.norm(g_u)
        assert np.linalg.norm((after - theta) / s) == pytest.approx(rho, rel=1e-12)
    np.testing.assert_allclose(after - theta, s * eps_u, rtol=1e-10, atol=1e-14)
    reported = np.concatenate([e.numpy().ravel() for e in opt.perturbation()])
    np.testing.assert_allclose(reported, s * eps_u, rtol=1e-12, atol=1e-15)
    # The pure function gives the same (structure preserved).
    eps = sat_perturbation(
        [p1.grad, p2.grad],
        rho,
        list(SCALES),
        adaptive,
        theta=[torch.tensor(theta[:3]), torch.tensor(theta[3:]).reshape(2, 2)],
    )
    assert [e.shape for e in eps] == [p1.shape, p2.shape]
    np.testing.assert_allclose(
        np.concatenate([e.numpy().ravel() for e in eps]), s * eps_u, rtol=1e-12
    )


def test_scale_is_not_ignored():
    g = torch.tensor([1.0, 1.0], dtype=DT)
    e1 = sat_perturbation(g, 1.0)
    e2 = sat_perturbation(g, 1.0, scale=torch.tensor([1.0, 3.0], dtype=DT))
    np.testing.assert_allclose(e1.numpy(), [2**-0.5, 2**-0.5], rtol=1e-12)
    # g_u = (1, 3), eps_u = (1, 3)/sqrt(10), eps = s * eps_u = (1, 9)/sqrt(10)
    np.testing.assert_allclose(e2.numpy(), np.array([1.0, 9.0]) / math.sqrt(10), rtol=1e-12)


def test_zero_gradient_is_safe():
    z = torch.zeros(4, dtype=DT)
    for adaptive in (False, True):
        eps = sat_perturbation(z, 0.1, scale=2.0, adaptive=adaptive, theta=torch.ones(4, dtype=DT))
        assert torch.equal(eps, torch.zeros(4, dtype=DT))
    p = torch.ones(3, dtype=DT, requires_grad=True)
    opt = SAT([p], torch.optim.Adam, rho=0.1, adaptive=True, lr=0.1)

    def closure():
        loss = (p * 0).sum()
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    assert torch.equal(p.detach(), torch.ones(3, dtype=DT))


def test_second_step_restores_and_uses_perturbed_gradient():
    loss, grad = _quadratic()
    p1, p2 = _params()
    rho, lr, mom = 0.2, 0.05, 0.9
    s = np.concatenate([x.ravel() for x in SCALES])
    opt = SAT([p1, p2], torch.optim.SGD, rho=rho, scale=list(SCALES), lr=lr, momentum=mom)
    theta = np.concatenate([p1.detach().numpy().ravel(), p2.detach().numpy().ravel()])
    buf = None
    for _ in range(3):
        opt.zero_grad()
        loss(p1, p2).backward()
        opt.first_step(zero_grad=True)
        loss(p1, p2).backward()
        opt.second_step()

        g_u = grad(theta) * s
        eps = s * rho * g_u / np.linalg.norm(g_u)
        g_pert = grad(theta + eps)
        buf = g_pert if buf is None else mom * buf + g_pert
        theta = theta - lr * buf
        got = np.concatenate([p1.detach().numpy().ravel(), p2.detach().numpy().ravel()])
        np.testing.assert_allclose(got, theta, rtol=1e-12, atol=1e-13)


def test_step_closure_equals_manual_steps_and_needs_gradients():
    loss, _ = _quadratic()
    pa, pb = _params(), _params()
    opt_a = SAT(list(pa), torch.optim.Adam, rho=0.1, lr=0.03)
    opt_b = SAT(list(pb), torch.optim.Adam, rho=0.1, lr=0.03)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt_a.step(lambda: loss(*pa).backward())
    for _ in range(5):
        opt_a.zero_grad()
        loss(*pa).backward()

        def closure():
            value = loss(*pa)
            value.backward()
            return value

        value = opt_a.step(closure)
        assert value.ndim == 0

        opt_b.zero_grad()
        loss(*pb).backward()
        opt_b.first_step(zero_grad=True)
        loss(*pb).backward()
        opt_b.second_step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_state_dict_roundtrip_resumes_identically():
    loss, _ = _quadratic()

    def run(opt, ps, n):
        for _ in range(n):
            opt.zero_grad()
            loss(*ps).backward()
            opt.step(lambda: loss(*ps).backward())

    pa = _params()
    opt_a = SAT(list(pa), torch.optim.Adam, rho=0.1, lr=0.03)
    run(opt_a, pa, 6)

    pb = _params()
    opt_b = SAT(list(pb), torch.optim.Adam, rho=0.1, lr=0.03)
    run(opt_b, pb, 3)
    sd = opt_b.state_dict()
    assert len(sd["state"]) == 2  # the base optimizer's moments are in it
    pc = tuple(p.detach().clone().requires_grad_(True) for p in pb)
    opt_c = SAT(list(pc), torch.optim.Adam, rho=0.1, lr=0.03)
    opt_c.load_state_dict(sd)
    run(opt_c, pc, 3)
    for x, y in zip(pa, pc):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


class _Dev:
    n_params, in_dim, out_dim = 4, 1, 1
    bounds = (np.array([0.0, 0.0, -1.0, -5.0]), np.array([1.0, 2 * np.pi, 1.0, 5.0]))
    periodic = np.array([False, True, False, True])

    def query(self, theta, x):
        return np.zeros((len(x), 1))


def test_projection_clips_and_wraps():
    info = describe(_Dev())
    proj = projector(info)
    theta0 = torch.tensor([0.5, 6.0, 0.5, 4.0], dtype=DT, requires_grad=True)
    w = torch.tensor([2.0, 1.0, -3.0, 3.0], dtype=DT)
    # Linear loss: the gradient is -w everywhere, so SGD(lr=1) moves theta by +w exactly.
    opt = SAT([theta0], torch.optim.SGD, rho=0.3, scale=info.scale, project=proj, lr=1.0)
    opt.zero_grad()
    (-(w * theta0).sum()).backward()
    opt.first_step(zero_grad=True)
    p = theta0.detach().numpy()
    assert np.all(p >= info.low) and np.all(p <= info.high)  # perturbed point is a valid setting
    (-(w * theta0).sum()).backward()
    opt.second_step()
    expected = [1.0, 7.0 - 2 * np.pi, -1.0, -3.0]
    np.testing.assert_allclose(theta0.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_projector_matches_deviceinfo_project_and_is_safe_in_float32():
    info = describe(_Dev())
    proj = projector(info)
    assert isinstance(projector(_Dev()), Projector)  # a device object is described on the fly
    rng = np.random.default_rng(0)
    x = rng.uniform(-20, 20, size=(200, 4))
    x[:4] = np.array([info.high, info.low, info.high + 2 * np.pi, info.low - 10])  # edges
    got = proj(torch.tensor(x, dtype=DT)).numpy()
    np.testing.assert_allclose(got, np.stack([info.project(r) for r in x]), rtol=0, atol=1e-12)
    assert np.all(got >= info.low) and np.all(got[:, [0, 2]] <= info.high[[0, 2]])
    assert np.all(got[:, [1, 3]] < info.high[[1, 3]])  # periodic: [low, high)
    f32 = proj(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert np.all(f32 >= info.low) and np.all(f32 <= info.high)
    # DeviceInfo.project itself (numpy in, numpy out) is accepted as `project`.
    p = torch.tensor([3.0, 7.0, 0.0, 0.0], dtype=DT, requires_grad=True)
    opt = SAT([p], torch.optim.SGD, rho=0.0, project=info.project, lr=0.0)
    p.grad = torch.zeros_like(p)
    opt.first_step()
    opt.second_step()
    np.testing.assert_allclose(p.detach().numpy(), [1.0, 7.0 - 2 * np.pi, 0.0, 0.0])


# --- behaviour: sharp vs flat minimum -------------------------------------------------------
# A narrow ravine (sharp along x: curvature ~1/0.03^2, slightly deeper) next to a wide round
# well (flat: curvature ~1/0.5^2). Plain Adam started in the ravine's basin settles at its
# bottom; SAT perturbs across the ravine, sees the loss there and is carried to the wide well.
C_SHARP = torch.tensor([0.0, 0.0], dtype=DT)
C_FLAT = torch.tensor([0.0, 1.2], dtype=DT)
W_SHARP = torch.tensor([0.03, 0.3], dtype=DT)


def _two_wells(x: torch.Tensor) -> torch.Tensor:
    sharp = 1.2 * torch.exp(-0.5 * (((x - C_SHARP) / W_SHARP) ** 2).sum())
    flat = 1.0 * torch.exp(-0.5 * ((x - C_FLAT) ** 2).sum() / 0.5**2)
    return -(sharp + flat)


def _train(start, rho=None, steps=300, lr=0.01):
    x = torch.tensor(start, dtype=DT, requires_grad=True)
    if rho is None:
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            _two_wells(x).backward()
            opt.step()
    else:
        opt = SAT([x], torch.optim.Adam, rho=rho, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            _two_wells(x).backward()
            opt.step(lambda: _two_wells(x).backward())
    return x.detach()


@pytest.mark.parametrize("start", [(0.05, 0.0), (-0.035, 0.21), (0.01, -0.3)])
def test_sat_finds_flat_minimum_where_adam_finds_sharp(start):
    assert _two_wells(C_SHARP) < _two_wells(C_FLAT)  # the sharp minimum is the deeper one
    adam = _train(start)
    assert torch.linalg.vector_norm(adam - C_SHARP) < 0.05, adam  # the flat well shifts it by ~0.02
    for rho in (0.1, 0.3):  # robust over rho from ~3x to ~10x the ravine's width
        sat = _train(start, rho=rho)
        assert torch.linalg.vector_norm(sat - C_FLAT) < 0.1, (rho, sat)


def test_sat_with_rho_below_the_ravine_width_stays_sharp():
    # Control: a perturbation that cannot reach out of the ravine does not see its sharpness
    # (start off the symmetry axis x = 0, where no method can see the x direction).
    sat = _train((0.05, 0.0), rho=0.01)
    assert torch.linalg.vector_norm(sat - C_SHARP) < 0.05, sat
