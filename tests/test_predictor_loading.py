"""Building the methods an evaluation runs (``speculation.predictors.loading``): heuristics by name, trained
predictors from their run directories, and what cannot run on given traces (said, not silently dropped)."""

from __future__ import annotations

import json
import shutil

import pytest
from synthetic import write_store

from speculation.predictors.loading import build_heuristics, load_trained_predictors
from speculation.traces import TraceStore, write_manifest
from speculation.workdir import PREDICTOR_FILE, Workdir


def test_traces_without_hidden_states_skip_gate_lookahead_and_say_why(tmp_path):
    store = write_store(tmp_path, None, num_tokens=500)
    write_manifest(tmp_path, dict(store.manifest.raw, hidden={"layers": [], "size": 0}))
    methods, skipped = build_heuristics(["oracle", "gate_lookahead"], TraceStore.open(tmp_path), seed=0)
    assert [m.name for m in methods] == ["oracle"] and "trace.save_hidden=true" in skipped["gate_lookahead"]


def test_trained_predictors_load_with_their_reach_and_another_models_are_refused(trained, tmp_path):
    store = TraceStore.open(Workdir(trained).traces())
    loaded, unfinished = load_trained_predictors(Workdir(trained).predictors, store)
    assert sorted(p.name for p in loaded) == [
        "contextual-seed0",
        "hierarchical-seed0",
        "probe-seed0",
        "transformer-seed0",
    ]
    assert unfinished == {}
    assert {p.max_lookahead for p in loaded} == {2} and {p.group for p in loaded} == {
        "contextual", "hierarchical", "probe", "transformer",
    }  # fmt: skip
    copy = tmp_path / "predictors" / "contextual-seed0"
    shutil.copytree(Workdir(trained).run("contextual-seed0"), copy)
    meta = json.loads((copy / PREDICTOR_FILE).read_text())
    (copy / PREDICTOR_FILE).write_text(json.dumps(meta | {"traces_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="trained on traces of another model"):
        load_trained_predictors(tmp_path / "predictors", store)
    (copy / PREDICTOR_FILE).write_text(json.dumps(meta | {"type": "psychic"}))
    with pytest.raises(ValueError, match=r"type 'psychic', which this version cannot load; known types: \['learned'\]"):
        load_trained_predictors(tmp_path / "predictors", store)
    (copy / PREDICTOR_FILE).unlink()
    assert load_trained_predictors(tmp_path / "predictors", store)[1]["contextual-seed0"].startswith("unfinished")
    assert load_trained_predictors(tmp_path / "nowhere", store) == ([], {})
