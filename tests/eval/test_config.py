"""The eval config: paper defaults, and invalid values rejected naming the field."""
import pytest

from genevolve_jax.eval.config import get_config, validate


def test_defaults_are_the_papers_weights():
    cfg = get_config()
    validate(cfg)
    w = cfg.wise
    assert "kscore" not in cfg   # the eval job scores with the reward's KScore weights (reward.kscore)
    assert (w.w_consistency, w.w_realism, w.w_aesthetics) == (0.7, 0.2, 0.1)
    assert (w.w_cultural, w.w_time, w.w_space, w.w_biology, w.w_physics, w.w_chemistry) == \
        (0.4, 0.167, 0.133, 0.1, 0.1, 0.1)


@pytest.mark.parametrize("path, value, message", [
    ("program_source", "oracle", "eval.program_source must be one of"),
    ("judge", "human", "eval.judge must be one of"),
    ("runner.max_concurrency", 0, "eval.runner.max_concurrency must be >= 1, got 0"),
    ("runner.requests_per_minute", -1.0, "eval.runner.requests_per_minute must be >= 0"),
    ("wise.w_aesthetics", 0.3, "eval.wise.w_consistency must be part of weights"),
    ("runner.limit", -1, "eval.runner.limit must be >= 0, got -1"),
    ("wise.w_time", 0.2, "eval.wise.w_cultural must be part of category weights"),
    ("wise.w_realism", -0.1, "eval.wise.w_realism must be >= 0"),
    ("report.thumb_px", 4, "eval.report.thumb_px must be >= 16"),
])
def test_invalid_values_name_the_field(path, value, message):
    cfg = get_config()
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_programs_source_needs_a_path():
    cfg = get_config()
    cfg.program_source = "programs"
    with pytest.raises(ValueError, match="eval.programs_path must be a cases.jsonl path"):
        validate(cfg)
