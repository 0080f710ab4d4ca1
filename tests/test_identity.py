"""Reuse only on a matching identity (``speculation.identity``)."""

from __future__ import annotations

import json

import pytest

from speculation.identity import claim_identity, differing_keys, flatten


def test_differences_are_named_by_their_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    saved = {"model": {"d_model": 32, "k": 1}, "data": "abc"}
    assert differing_keys(saved, {"model": {"d_model": 64, "k": 1}, "data": "abc", "new": 1}) == [
        "model.d_model",
        "new",
    ]
    assert differing_keys(saved, json.loads(json.dumps(saved))) == []


def test_a_new_identity_is_written_a_match_passes_and_another_is_refused(tmp_path):
    path = tmp_path / "config.json"
    claim_identity(path, {"model": {"k": 1}}, holds="a model", fix="Use another workdir.")
    assert json.loads(path.read_text()) == {"model": {"k": 1}}
    claim_identity(path, {"model": {"k": 1}}, holds="a model", fix="Use another workdir.")
    with pytest.raises(
        ValueError, match=rf"^{tmp_path} holds a model \(differs in: model.k\)\. Use another workdir\.$"
    ):
        claim_identity(path, {"model": {"k": 2}}, holds="a model", fix="Use another workdir.")
    assert json.loads(path.read_text()) == {"model": {"k": 1}}  # the refused identity changed nothing


def test_an_option_added_later_matches_at_its_default_only(tmp_path):
    path = tmp_path / "identity.json"
    claim_identity(path, {"train": {"lr": 0.1}}, holds="a run", fix="Fix.")  # made before "loss.miss_weight" existed
    defaults = {"train": {"lr": 0.2}, "loss": {"miss_weight": 0.0}}
    claim_identity(path, {"train": {"lr": 0.1}, "loss": {"miss_weight": 0.0}}, "a run", "Fix.", defaults)
    with pytest.raises(ValueError, match=r"differs in: loss.miss_weight\)"):
        claim_identity(path, {"train": {"lr": 0.1}, "loss": {"miss_weight": 2.0}}, "a run", "Fix.", defaults)
    with pytest.raises(ValueError, match=r"differs in: train.lr\)"):  # a saved key is compared as it is
        claim_identity(path, {"train": {"lr": 0.2}, "loss": {"miss_weight": 0.0}}, "a run", "Fix.", defaults)
