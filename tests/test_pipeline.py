"""``spec-pipeline`` (``speculation.stages.pipeline``): one predictor per kind, and a config that cannot be
evaluated on the model's geometry refused before the first stage runs."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_COLLECT, compose_config
from hf_tiny import save_tiny

from speculation.config import to_object
from speculation.config.evaluate import EvalConfig
from speculation.config.rules import Geometry, fit_to_geometry
from speculation.config.simulate import SimConfig
from speculation.config.stages import PipelineConfig
from speculation.stages.pipeline import pipeline, planned_geometry
from speculation.traces import TraceStore
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


def test_an_hf_models_geometry_is_checked_before_it_is_loaded_or_traced(tmp_path):
    # tiny Mixtral: 2 MoE layers of 4 experts, top-2; read from config.json, so nothing is written before the error
    checkpoint = save_tiny("mixtral", tmp_path / "checkpoint")
    workdir = tmp_path / "work"
    overrides = [*TINY_COLLECT, "model=hf", f"model.path={checkpoint}", f"workdir={workdir}"]
    cfg = compose_config("pipeline", [*overrides, "sim.lookaheads=[1,2]", "sim.cache_fractions=[0.1,0.5]"])
    with pytest.raises(ValueError, match=r"sim.lookaheads has \[2\] .*\n- sim.cache_fractions has 0.1: 1 expert slots"):
        pipeline(cfg)
    assert not workdir.exists()
    planned = planned_geometry(to_object(compose_config("pipeline", overrides), PipelineConfig))
    eval_cfg, sim = fit_to_geometry(EvalConfig(), SimConfig(), planned)  # what the defaults become: d = 1 only
    assert (planned.num_layers, eval_cfg.max_lookahead, sim.lookaheads, sim.headline_lookahead) == (2, 1, [1], 1)


def test_the_encoder_stack_of_a_decoder_only_model_is_refused_at_start(tmp_path):
    cfg = compose_config("pipeline", [*TINY_COLLECT, f"workdir={tmp_path / 'work'}", "eval.stack=encoder"])
    with pytest.raises(ValueError, match=r"eval.stack=encoder but the embedded model is decoder-only"):
        pipeline(cfg)
    assert not (tmp_path / "work").exists()


def test_a_model_traced_from_another_workdir_is_checked_against_its_own_saved_architecture(tmp_path):
    # model.source_workdir: that workdir's config.json sets the architecture (here 4 layers, 2 MoE), not ours
    saved = tmp_path / "source" / "source_model" / "config.json"
    saved.parent.mkdir(parents=True)
    model = {"kind": "embedded", "name": "other", "vocab_size": 300, "d_model": 32, "num_layers": 4, "num_heads": 2,
             "d_ff": 64, "num_experts": 4, "moe_every": 2, "max_seq_len": 64, "dropout": 0.0}  # fmt: skip
    router = {"gate": "linear", "selection": "topk", "k": 2, "k_max": 2, "capacity_factor": None, "temperature": 1.0,
              "span_length": 1, "cosine_dim": 16, "load_balance_coef": 0.01, "z_loss_coef": 0.001}  # fmt: skip
    saved.write_text(json.dumps({"model": model, "router": router, "data": "x", "source_train": {}}))
    overrides = [*TINY_COLLECT, f"workdir={tmp_path / 'work'}", f"model.source_workdir={tmp_path / 'source'}"]
    cfg = to_object(compose_config("pipeline", overrides), PipelineConfig)
    assert planned_geometry(cfg) == Geometry(num_layers=2, num_experts=4, experts_per_token=2)
    (saved.parent / "config.json").unlink()  # not trained yet: collect says so, before any work
    assert planned_geometry(cfg) is None


def test_the_geometry_planned_at_start_is_the_one_the_manifest_records(collected):
    cfg = to_object(compose_config("pipeline", [*TINY_COLLECT, f"workdir={collected}"]), PipelineConfig)
    assert planned_geometry(cfg) == TraceStore.open(collected / "traces", verify=False).manifest.sizes
