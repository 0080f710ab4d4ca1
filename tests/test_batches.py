"""Trace batches (``speculation.traces.batches``): whole sequences per block, the router's distribution, the rows
the simulator replays, and gate-lookahead at d = 0 reproducing the routers' choices from a loaded batch."""

from __future__ import annotations

import numpy as np
from synthetic import L, tiny_model, write_store

from speculation.predictors import GateLookaheadPredictor
from speculation.traces.batches import first_rows, iter_batches, load_batch, previous_rows, sequence_blocks


def test_blocks_keep_sequences_whole():
    seq = np.repeat([0, 1, 2, 3], [3, 5, 2, 4])
    blocks = sequence_blocks(seq, max_rows=4)
    assert [(b.start, b.stop) for b in blocks] == [(0, 8), (8, 14)]
    for block in blocks:
        assert block.start == 0 or seq[block.start] != seq[block.start - 1]
    assert previous_rows(np.array([0, 0, 1, 1, 1])).tolist() == [-1, 0, -1, 2, 3]


def test_a_batch_holds_its_rows_with_the_routers_distribution(tmp_path):
    store = write_store(tmp_path, None, num_tokens=400)
    batch = load_batch(store, "test", slice(100, 200))
    logits = store.split("test").array("logits")[100:200].astype(np.float32)
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(batch.probs_NLE, expected, rtol=1e-5)
    assert batch.hidden_layers == list(range(L)) and batch.hidden_NLH.shape == (100, L, 16)
    assert load_batch(store, "test", slice(0, 50), hidden=False).hidden_NLH is None
    assert sum(b.num_rows for b in iter_batches(store, "test", 120)) == 400
    assert first_rows(store, "test", 120) == slice(0, 150)  # whole 50-token sequences up to about 120 tokens


def test_gate_lookahead_at_d0_reproduces_the_routers_choices_up_to_float16_ties(tmp_path):
    store = write_store(tmp_path, tiny_model(), num_tokens=5_000)
    predictor = GateLookaheadPredictor.from_store(store)
    batch = load_batch(store, "test", slice(0, store.split("test").num_rows))
    ties = 0
    for layer in range(L):
        probs_NE = predictor.predict(batch, layer, [0]).probs_NDE[:, 0]
        chosen_N = batch.experts_NLK[:, layer, 0]
        differ = probs_NE.argmax(-1) != chosen_N
        # Gate lookahead scores float16 scores (as a store keeps them): where rounding ties the router's choice with
        # another expert, argmax may name the other one; the router's choice is still a top score there.
        np.testing.assert_array_equal(probs_NE[differ, chosen_N[differ]], probs_NE[differ].max(-1))
        ties += int(differ.sum())
    assert ties <= 0.01 * L * batch.num_rows
