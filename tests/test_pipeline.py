"""``spec-pipeline`` (``speculation.stages.pipeline``): one predictor per kind, and a config that cannot be
evaluated on the model's geometry refused before the first stage runs."""

from __future__ import annotations

import pytest
from conftest import TINY_COLLECT, compose_config

from speculation.stages.pipeline import pipeline
from speculation.workdir import Workdir


def test_the_pipeline_trains_one_predictor_per_kind(trained):
    assert sorted(p.name for p in Workdir(trained).predictors.iterdir()) == [
        "contextual-seed0", "hierarchical-seed0", "probe-seed0", "transformer-seed0",
    ]  # fmt: skip


def test_a_lookahead_past_the_models_layers_fails_before_collecting(tmp_path):
    workdir = tmp_path / "work"
    cfg = compose_config("pipeline", [*TINY_COLLECT, f"workdir={workdir}", "eval.max_lookahead=5"])
    with pytest.raises(ValueError, match=r"eval.max_lookahead=5 but the traces have 4 MoE layers"):
        pipeline(cfg)
    assert not workdir.exists()  # nothing was trained or traced
