"""Guided ES, the loop's surrogate monitor, and the measured scale of unbounded devices."""

import numpy as np
import pytest

from blackbox_sat.devices.contract import describe
from blackbox_sat.devices.scale import measure_scale
from blackbox_sat.training.guided import Guide
from blackbox_sat.training.step_choice import SurrogateMonitor

from .toy_devices import BarePeriodic

N = 50


def quadratic(seed=0):
    """``f(u) = u^T A u / 2 + b^T u`` and its gradient at a point."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(N, N)) / np.sqrt(N)
    a, b, u0 = m @ m.T + np.eye(N), rng.normal(size=N), rng.normal(size=N)
    return (lambda u: 0.5 * u @ a @ u + b @ u), u0, a @ u0 + b


def mean_estimate(guide, f, u0, pairs=20000, c=1e-3, seed=1):
    rng = np.random.default_rng(seed)
    total = np.zeros(N)
    for _ in range(pairs):
        d = guide.direction(rng)
        total += (f(u0 + c * d) - f(u0 - c * d)) / (2 * c) * d
    return total / pairs


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_wrong_guide_leaves_the_estimate_unbiased():
    f, u0, grad = quadratic()
    rng = np.random.default_rng(3)
    guide = Guide(N, k=4, alpha=0.5)
    for _ in range(4):  # a guide orthogonal to the true gradient: wrong everywhere
        v = rng.normal(size=N)
        guide.add(v - (v @ grad) / (grad @ grad) * grad)
    assert guide.basis().shape == (N, 4)
    mean = mean_estimate(guide, f, u0)
    assert cos(mean, grad) > 0.97  # the true gradient's direction, not the guide's
    assert np.linalg.norm(mean) == pytest.approx(0.5 * np.linalg.norm(grad), rel=0.1)  # alpha


def test_a_good_guide_gives_better_single_estimates_than_isotropic_search():
    f, u0, grad = quadratic()
    rng = np.random.default_rng(4)
    guided, plain = Guide(N, k=2, alpha=0.5), Guide(N)
    guided.add(grad + 0.3 * np.linalg.norm(grad) / np.sqrt(N) * rng.normal(size=N))
    guided.add(rng.normal(size=N))

    def mean_cos(guide):
        r = np.random.default_rng(5)
        cs = []
        for _ in range(400):
            d = guide.direction(r)
            cs.append(cos((f(u0 + 1e-3 * d) - f(u0 - 1e-3 * d)) / 2e-3 * d, grad))
        return np.mean(cs)

    assert mean_cos(guided) > 3 * mean_cos(plain)


def test_directions_have_the_units_of_the_zeroth_order_rules():
    guide = Guide(N, k=3, alpha=0.3)
    for v in np.random.default_rng(0).normal(size=(3, N)):
        guide.add(v)
    rng = np.random.default_rng(1)
    d = np.stack([guide.direction(rng) for _ in range(20000)])
    assert np.trace(d.T @ d / len(d)) == pytest.approx(N, rel=0.03)  # E[d d^T] has trace n


def monitor_with(records, **kw):
    """A monitor after surrogate rounds of 50 settings each; rounds that made the loss
    rise were rejected."""
    m = SurrogateMonitor(**kw)
    for predicted, measured in records:
        m.observe("surrogate", predicted, measured, 50, accepted=measured >= 0)
    return m


def test_the_monitor_keeps_a_surrogate_whose_predictions_come_true():
    m = monitor_with([(0.3, 0.25), (0.2, 0.1), (-0.2, -0.15), (0.1, 0.12)])  # rises too
    assert not m.failing(tol=0.05)
    assert m.next_kind(0.05) == "surrogate"  # the fallback waits until the surrogate fails
    m.observe("guided", 0.0, 0.01, 50)  # measured anyway (a forced round): found slower
    assert m.next_kind(0.05) == "surrogate"


def test_a_faster_fallback_takes_the_budget_from_a_surrogate_that_predicts_well():
    m = monitor_with([(0.3, 0.25), (0.02, 0.02), (0.01, 0.01), (0.01, 0.01)])
    m.observe("guided", 0.0, 0.2, 50)
    assert not m.failing(tol=0.05) and m.next_kind(0.05) == "guided"


def test_the_monitor_moves_rounds_away_from_a_failing_surrogate_and_retries_it():
    m = monitor_with([(0.3, -0.1), (0.4, 0.0), (0.2, -0.05), (0.3, 0.05)], fallback="harmonic")
    assert m.failing(tol=0.05)
    kinds = []
    for _ in range(12):
        kind = m.next_kind(0.05)
        kinds.append(kind)
        # the fallback makes slow progress; the surrogate's retries keep failing
        m.observe(kind, 0.3, 0.05 if kind == "harmonic" else -0.1, 50, accepted=kind == "harmonic")
    # retried after 4 rounds, then after 8: the retries back off
    assert kinds == ["harmonic"] * 3 + ["surrogate"] + ["harmonic"] * 7 + ["surrogate"]


def test_a_fallback_that_achieves_nothing_does_not_take_the_budget():
    m = monitor_with([(0.3, -0.1), (0.4, 0.0), (0.2, -0.05), (0.3, 0.05)], fallback="guided")
    assert m.failing(tol=0.05)
    for kind in ("guided", "guided"):  # both rejected
        m.observe(kind, 0.0, -0.2, 50, accepted=False)
    assert m.preferred(0.05) == "surrogate"


def test_noise_alone_does_not_condemn_a_surrogate():
    # predicted changes that do not come true, but by no more than the check loss's noise
    m = monitor_with([(0.1, 0.0), (0.1, -0.02), (0.05, 0.01), (-0.05, 0.0)])
    assert not m.failing(tol=0.05)
    assert m.failing(tol=0.01)  # the same record with a tenth of the noise condemns it


def test_the_scale_rule_gives_the_same_normalized_steps_in_any_units():
    x = np.random.default_rng(0).uniform(-1, 1, (32, 4))
    scales = []
    for unit in (1.0, 1000.0):
        dev = BarePeriodic(unit=unit, noise=0.0)
        theta0 = np.full(dev.n_params, 0.3 * unit)
        free = ~np.isfinite(describe(dev).high)
        out = measure_scale(lambda t, dev=dev: dev.query(t, x), theta0, free)
        scales.append(out["scale"])
        assert out["settings"] < 30
    assert scales[1] / scales[0] == pytest.approx(1000, rel=0.005)
    # the normalized step u = theta / scale moves the device the same way in both units
    steps = np.random.default_rng(1).normal(0, 0.05, (5, 16))
    for s in steps:
        ys = [
            BarePeriodic(unit=u, noise=0.0).query(np.full(16, 0.3 * u) + s * sc, x)
            for u, sc in zip((1.0, 1000.0), scales)
        ]
        np.testing.assert_allclose(ys[0], ys[1], atol=0.01)  # outputs spread about 0.8


FAST = {
    "surrogate": "hyper",
    "surrogate.hyper.n_members": 2,
    "surrogate.hyper.max_steps": 300,
    "steps_per_round": 10,
    "probes_per_round": 10,
    "refit_steps": 30,
    "init_fraction": 0.25,
}


def run_on(spec, budget=500):
    from blackbox_sat.training.pipeline import run_pipeline

    from .conftest import make_ctx

    ctx = make_ctx(spec, budget=budget, method="blackbox", config=FAST)
    extra = run_pipeline(ctx, ctx.config)[1]
    # every setting spent after the readout gain's is booked to a step type
    assert sum(extra["budget_by_step"].values()) == ctx.device.settings_used - 1
    return extra


def test_the_rule_moves_budget_off_a_surrogate_the_device_defeats():
    from .toy_devices import jagged, opaque

    defeated, smooth = run_on(jagged()), run_on(opaque())
    kinds = [r["kind"] for r in defeated["round_log"]]
    # the failing surrogate hands rounds to guided ES (tried, then retried), more than on a
    # smooth device where the surrogate keeps its predictions
    assert kinds.count("guided") >= 2
    spent = defeated["budget_by_step"].get("guided_steps", 0)
    assert spent > smooth["budget_by_step"].get("guided_steps", 0)


@pytest.mark.slow
def test_a_bare_adapter_trains_through_the_cli_well_above_chance(tmp_path, capsys):
    """Four members, a periodic response, no bounds: the measured scale makes it trainable."""
    import json

    from blackbox_sat.cli import main

    out = tmp_path / "bare"
    args = [
        "train",
        "--device",
        "tests.toy_devices:bare_periodic",
        "--task",
        "iris",
        "--budget",
        "1000",
    ]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["accuracy"] > 0.7  # chance is 1/3 (0.822 measured, spsa 0.689)
    assert result["free_scale"] > 0


def test_check_device_reports_the_scale_it_would_use():
    from blackbox_sat.devices.check import check_device

    from .toy_devices import opaque

    bare = check_device(BarePeriodic(noise=0.0))
    assert isinstance(bare["scale"], float) and 1 < bare["scale"] < 10  # period 2 pi
    assert check_device(opaque())["scale"] == "bound widths"
