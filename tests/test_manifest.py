"""The typed manifest (``speculation.traces.manifest``): its fields, its schema and range checks (one clear error
naming what is wrong), and a fingerprint of the traced model's content that ignores its name, path and corpus."""

from __future__ import annotations

import copy

import pytest
from synthetic import synthetic_manifest

from speculation.identity import json_sha256
from speculation.traces.manifest import Manifest, TraceFormatError

SHARD = {"name": "shard-00000", "rows": 3, "sha256": {}, "ranges": {"experts": [-1, 7], "token": [0, 9], "doc": [0, 0],
                                                                  "pos": [0, 2], "seq": [0, 0]}}  # fmt: skip
RAW = synthetic_manifest(
    {"layers": ["decoder.1", "decoder.3"]},
    model={"name": "switch-lm-8", "source_dir": "../source_model"},
    geometry={"vocab_size": 10},
    hidden={"layers": [0, 1], "size": 16},
    splits={"test": {"rows": 3, "shards": [SHARD]}},
    corpus={"fingerprint": "abc"},
)


def test_typed_fields():
    manifest = Manifest.from_dict(RAW)
    assert (manifest.num_layers, manifest.num_experts, manifest.routing.max_experts_per_token) == (2, 8, 1)
    assert manifest.layer_names == ["decoder.1", "decoder.3"] and manifest.hidden.size == 16
    assert manifest.model_name == "switch-lm-8" and manifest.stack == "decoder"
    assert manifest.router_family == "embedded_switch" and manifest.routing.score == "softmax"
    assert manifest.router_weights_file == "router_weights.safetensors" and manifest.missing_hidden(range(3)) == [2]
    assert (manifest.sizes.num_layers, manifest.sizes.num_experts, manifest.sizes.experts_per_token) == (2, 8, 1)


def without(path: str) -> dict:
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    del node[last]
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (without("geometry"), r"the top level: 'geometry' is a required property"),
        (without("geometry.d_ff"), r"geometry: 'd_ff' is a required property"),
        (without("model.weights_sha256"), r"model: 'weights_sha256' is a required property"),
        ({**RAW, "routing": {**RAW["routing"], "score": "relu"}}, r"routing.score: 'relu' is not one of"),
        ({**RAW, "routing": {**RAW["routing"], "num_experts": 4}}, r"routing.num_experts=4 but geometry.num_experts=8"),
        ({**RAW, "hidden": {"layers": [0, 5], "size": 16}}, r"hidden.layers \[5\] are not among the 2 MoE layers"),
    ],
)
def test_what_a_manifest_lacks_is_one_clear_error(raw, message):
    with pytest.raises(TraceFormatError, match=rf"^m.json: {message}.*; delete the store and re-run spec-collect$"):
        Manifest.from_dict(raw, source="m.json")


@pytest.mark.parametrize(
    ("field", "span", "allowed"),
    [("experts", [-1, 8], r"\[-1, 7\]"), ("experts", [-2, 3], r"\[-1, 7\]"), ("token", [0, 10], r"\[0, 9\]"),
     ("pos", [-1, 4], ">= 0")],
)  # fmt: skip
def test_values_outside_the_geometry_are_refused_when_the_store_opens(field, span, allowed):
    raw = copy.deepcopy(RAW)
    raw["splits"]["test"]["shards"][0]["ranges"][field] = span
    with pytest.raises(TraceFormatError, match=rf"test/shard-00000 has {field} values in \[{span[0]}, {span[1]}\], "
                                               rf"outside {allowed}"):  # fmt: skip
        Manifest.from_dict(raw)


def test_the_fingerprint_identifies_the_models_content_not_its_name_path_or_corpus():
    expected = json_sha256(
        {"weights": "synthetic-weights", "tokenizer": "synthetic-tokenizer", "config": "synthetic-config",
         "stack": "decoder", "geometry": RAW["geometry"], "layers": ["decoder.1", "decoder.3"]}
    )  # fmt: skip
    assert Manifest.from_dict(RAW).fingerprint() == expected  # stable: predictor.json files keep matching
    moved = {**RAW, "corpus": {"fingerprint": "xyz"}, "splits": {}, "model": {**RAW["model"], "name": "x"}}
    moved["model"]["source_dir"] = "elsewhere"
    assert Manifest.from_dict(moved).fingerprint() == expected
    for section, key, value in [("model", "weights_sha256", "retrained"), ("model", "tokenizer_sha256", "other"),
                                ("model", "config_sha256", "other"), ("geometry", "d_model", 256)]:  # fmt: skip
        changed = {**RAW, section: {**RAW[section], key: value}}
        assert Manifest.from_dict(changed).fingerprint() != expected, key
