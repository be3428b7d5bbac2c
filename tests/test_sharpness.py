"""Sharpness measures against analytic values on quadratics and linear losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blackbox_sat.optim.sharpness import sharpness_gap, top_hessian_eigenvalue, worst_case_loss

DT = torch.float64
EIGS = np.array([10.0, 4.0, 2.0, 1.0, 0.5, 0.1])
SCALE = np.array([0.5, 2.0, 1.0, 3.0, 0.2, 1.5])


def _matrix(eigs: np.ndarray, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def _quad(a: np.ndarray, center: np.ndarray | None = None):
    A = torch.tensor(a, dtype=DT)
    c = torch.zeros(len(a), dtype=DT) if center is None else torch.tensor(center, dtype=DT)
    return lambda x: 0.5 * (x - c) @ A @ (x - c)


def test_top_eigenvalue_of_quadratic():
    a = _matrix(EIGS)
    theta = torch.tensor(np.random.default_rng(2).normal(size=6), dtype=DT)
    lam = top_hessian_eigenvalue(_quad(a, center=np.ones(6)), theta)
    assert lam == pytest.approx(10.0, rel=0.01)
    # numpy input and another seed give the same answer
    assert top_hessian_eigenvalue(_quad(a), np.zeros(6), seed=5) == pytest.approx(10.0, rel=0.01)


def test_top_eigenvalue_in_normalized_coordinates():
    a = _matrix(EIGS)
    sas = np.diag(SCALE) @ a @ np.diag(SCALE)
    want = np.linalg.eigvalsh(sas)[-1]
    assert abs(want - np.linalg.eigvalsh(a)[-1]) > 0.1 * want  # the scale matters here
    lam = top_hessian_eigenvalue(
        _quad(a), torch.zeros(6, dtype=DT), scale=SCALE, iters=50, tol=1e-6
    )
    assert lam == pytest.approx(want, rel=0.01)


def test_top_eigenvalue_is_largest_not_largest_magnitude():
    a = _matrix(np.array([-8.0, 3.0, 1.0, -0.5]))
    lam = top_hessian_eigenvalue(_quad(a), torch.zeros(4, dtype=DT), iters=100, tol=1e-8)
    assert lam == pytest.approx(3.0, rel=0.01)


def test_top_eigenvalue_of_linear_loss_is_zero():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    assert top_hessian_eigenvalue(lambda x: w @ x, torch.ones(3, dtype=DT)) == 0.0


@pytest.mark.parametrize("scale", [None, SCALE])
def test_worst_case_loss_of_quadratic(scale):
    a = _matrix(EIGS)
    rho = 0.3
    s = np.ones(6) if scale is None else scale
    lam_max = np.linalg.eigvalsh(np.diag(s) @ a @ np.diag(s))[-1]
    want = rho**2 * lam_max / 2
    got = worst_case_loss(_quad(a), torch.zeros(6, dtype=DT), rho, scale=scale)
    assert got == pytest.approx(want, rel=0.03)
    assert got <= want * (1 + 1e-9)  # it is a max over points inside the ball
    gap = sharpness_gap(_quad(a), np.zeros(6), rho, scale=scale)
    assert gap == pytest.approx(got, rel=1e-12)  # loss at the centre is 0


def test_worst_case_loss_of_linear_loss_is_exact():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    s = torch.tensor([2.0, 0.5, 4.0], dtype=DT)
    theta = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    f = lambda x: w @ x  # noqa: E731
    got = worst_case_loss(f, theta, 0.2, scale=s, n_random=0)
    assert got == pytest.approx(
        float(f(theta)) + 0.2 * float(torch.linalg.vector_norm(w * s)), rel=1e-12
    )
    gap = sharpness_gap(f, theta, 0.2, scale=s)
    assert gap == pytest.approx(0.2 * float(torch.linalg.vector_norm(w * s)), rel=1e-10)
    assert worst_case_loss(f, theta, 0.0) == pytest.approx(float(f(theta)))
