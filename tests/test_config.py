"""Typed configuration: dotted keys, coercion, nested defaults kept, old run files still load."""

from __future__ import annotations

import pytest

from blackbox_sat.methods import get_method
from blackbox_sat.training.config import ConfigError, as_dict, build
from blackbox_sat.training.pipeline import PipelineConfig


def test_dotted_keys_reach_nested_fields_and_keep_their_siblings():
    cfg = build(
        PipelineConfig, {"surrogate.hyper.max_steps": "1234", "refine.rule": "spsa", "rho": "0.05"}
    )
    assert cfg.surrogate.hyper.max_steps == 1234 and cfg.refine.rule == "spsa" and cfg.rho == 0.05
    assert cfg.surrogate.hyper.n_members == 3  # the pipeline's default for hyper survives
    assert cfg.refine.c == PipelineConfig().refine.c  # and so does every other refine option


def test_text_is_coerced_to_the_field_type():
    cfg = build(
        PipelineConfig,
        {
            "learn_from_steps": "false",
            "refit_steps": "None",
            "accept_tol": "0.1",
            "surrogate.candidates": "hyper,gp",
        },
    )
    assert cfg.learn_from_steps is False and cfg.refit_steps is None and cfg.accept_tol == 0.1
    assert cfg.surrogate.candidates == ("hyper", "gp")
    assert build(PipelineConfig, {"accept_tol": "auto"}).accept_tol == "auto"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"rho": "abc"}, "expected float"),
        ({"steps_per_round": "2.5"}, "expected int"),
        ({"radius_min": 0.5}, "radius_min <= radius"),
        ({"surrogate": "nonsense"}, "unknown surrogate family"),
        ({"refine": 3}, "group of options"),
    ],
)
def test_bad_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(PipelineConfig, overrides)


def test_a_run_written_before_the_typed_configuration_loads():
    old = {
        "surrogate": "interferometric",
        "surrogate_kw": {"interferometric": {"n_members": 2}},
        "refine_rule": "spsa",
        "surrogate_candidates": ["hyper"],
        "gp_max_params": 7,
        "rho": 0.0,
    }
    cfg = build(PipelineConfig, old)
    assert (
        cfg.surrogate.family == "interferometric" and cfg.surrogate.interferometric.n_members == 2
    )
    assert (
        cfg.refine.rule == "spsa"
        and cfg.surrogate.candidates == ("hyper",)
        and cfg.surrogate.gp_max_params == 7
    )


@pytest.mark.parametrize("method", ["blackbox-sat", "spsa", "ng-cma", "oracle", "insitu-sat"])
def test_the_resolved_configuration_round_trips_through_json(method):
    cls = get_method(method).config
    cfg = build(cls, {})
    assert build(cls, as_dict(cfg)) == cfg
