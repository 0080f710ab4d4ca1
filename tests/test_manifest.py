"""The typed manifest (``speculation.traces.manifest``): its fields and defaults, one clear error for what it
lacks, and a fingerprint of the traced model that ignores the corpus and the splits."""

from __future__ import annotations

import hashlib
import json

import pytest

from speculation.traces.manifest import Manifest, TraceFormatError

RAW = {
    "model": {"kind": "embedded", "name": "switch-lm-8", "source_dir": "../source_model"},
    "geometry": {"d_model": 128, "d_ff": 512, "num_experts": 8},
    "routing": {"num_experts": 8, "max_experts_per_token": 1, "layers": ["decoder.1", "decoder.3"], "score": "softmax"},
    "hidden": {"layers": [0, 1], "size": 128},
    "adapter": "embedded_switch",
    "splits": {"test": {"rows": 3, "shards": []}},
    "corpus": {"fingerprint": "abc"},
}


def test_typed_fields_and_their_defaults():
    manifest = Manifest.from_dict(RAW)
    assert (manifest.num_layers, manifest.num_experts, manifest.routing.max_experts_per_token) == (2, 8, 1)
    assert manifest.layer_names == ["decoder.1", "decoder.3"] and manifest.hidden.size == 128
    assert (
        manifest.model_name == "switch-lm-8"
        and manifest.stack == "decoder"
        and manifest.router_family == "embedded_switch"
    )
    assert manifest.router_weights_file == "router_weights.safetensors" and manifest.missing_hidden(range(3)) == [2]
    assert (manifest.sizes.num_layers, manifest.sizes.num_experts, manifest.sizes.experts_per_token) == (2, 8, 1)
    bare = Manifest.from_dict(
        {"routing": {"num_experts": 4, "max_experts_per_token": 2, "layers": ["a"]}, "splits": {}}
    )
    assert bare.routing.score == "softmax" and bare.hidden.layers == [] and bare.geometry == {} and bare.adapter is None


def test_what_a_manifest_lacks_is_one_clear_error():
    with pytest.raises(TraceFormatError, match=r"^m.json: manifest needs 'routing'.*delete it and re-run spec-collect"):
        Manifest.from_dict({"splits": {}}, source="m.json")
    bad_score = {**RAW, "routing": {**RAW["routing"], "score": "relu"}}
    with pytest.raises(TraceFormatError, match=r"routing score 'relu' is not one of \('softmax', 'sigmoid'\)"):
        Manifest.from_dict(bad_score)


def test_the_fingerprint_identifies_the_model_not_the_corpus():
    identity = {
        "model": RAW["model"],
        "geometry": RAW["geometry"],
        "layers": RAW["routing"]["layers"],
        "num_experts": 8,
    }
    expected = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    assert Manifest.from_dict(RAW).fingerprint() == expected  # stable: predictor.json files keep matching
    other_corpus = {**RAW, "corpus": {"fingerprint": "xyz"}, "splits": {}}
    assert Manifest.from_dict(other_corpus).fingerprint() == expected
    wider = {**RAW, "geometry": {**RAW["geometry"], "d_model": 256}}
    assert Manifest.from_dict(wider).fingerprint() != expected
