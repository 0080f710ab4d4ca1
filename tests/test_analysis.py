"""What there is to predict (``speculation.traces.analysis``): health equal to what spec-collect recorded,
transitions, entropy and temporal locality on hand-made routing with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import synthetic_manifest

from speculation.traces import SplitWriter, TraceStore, analysis, write_manifest
from speculation.workdir import SUMMARY_FILE, Workdir


def test_split_health_is_what_the_collect_stage_recorded(collected):
    store = TraceStore.open(Workdir(collected).traces())
    recorded = json.loads((Workdir(collected).traces() / SUMMARY_FILE).read_text())["splits"]["test"]["layers"]
    table = analysis.health_table(analysis.split_health(store, "test"))
    for layer, row in table.iterrows():
        assert row["load_balance_score"] == pytest.approx(recorded[layer]["load_balance_score"])
        assert row["gate_entropy_normalised"] == pytest.approx(recorded[layer]["gate_entropy_normalised"])
    assert list(table.index) == store.layer_names and analysis.splits_table(store).loc["test", "rows"] > 0
    assert analysis.model_facts(store)["num_experts (E)"] == 8


def hand_made_store(root):
    """Two sequences of 4 tokens, 2 layers, 2 experts: layer 1 copies layer 0; layer 0 repeats 4 times in 6."""
    top1_NL = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]])
    logits = np.where(np.eye(2, dtype=bool)[top1_NL], 2.0, 0.0)  # [N, L, E]: the chosen expert has logit 2
    seq = np.repeat([0, 1], 4)
    arrays = {"experts": top1_NL[..., None], "gates": np.ones((8, 2, 1)), "logits": logits,
              "token": np.zeros(8, dtype=int), "doc": seq, "pos": np.tile(np.arange(4), 2), "seq": seq}  # fmt: skip
    writer = SplitWriter(root, "test")
    writer.write_shard(0, arrays)
    routing = {"num_experts": 2, "max_experts_per_token": 1, "layers": ["decoder.0", "decoder.1"]}
    write_manifest(root, synthetic_manifest(routing, splits={"test": writer.finalize(1)}))
    return TraceStore.open(root)


def test_transitions_entropy_and_locality_on_known_routing(tmp_path):
    store = hand_made_store(tmp_path)
    (probs_EE,) = analysis.transition_probs(store, "test")
    np.testing.assert_array_equal(probs_EE, np.eye(2))  # layer 1 always copies layer 0
    row = analysis.transition_table(store, "test").iloc[0]  # no train split: fitted on test itself
    assert row["conditional_acc"] == 1.0 and row["same_id"] == 1.0 and row["prior_acc"] == 5 / 8
    entropy = analysis.entropy_table(store, "test")
    p = np.exp(2) / (np.exp(2) + 1)
    assert entropy["mean"].to_numpy() == pytest.approx(-(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2))
    temporal = analysis.temporal_table(store, "test").loc["decoder.0"]
    # pairs within a sequence: (0,0) (0,1) (1,1) | (1,0) (0,0) (0,0): 4 repeats of 6; load 5/8 vs 3/8
    assert temporal["repeat_rate"] == pytest.approx(4 / 6) and temporal["token_pairs"] == 6
    assert temporal["chance"] == pytest.approx((5 / 8) ** 2 + (3 / 8) ** 2)
