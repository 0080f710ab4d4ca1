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


def test_gate_lookahead_at_d0_reproduces_the_routers_choices_exactly(tmp_path):
    store = write_store(tmp_path, tiny_model(), num_tokens=5_000)
    predictor = GateLookaheadPredictor.from_store(store)
    batch = load_batch(store, "test", slice(0, store.split("test").num_rows))
    for layer in range(L):
        choice = predictor.predict(batch, layer, [0]).probs_NDE[:, 0].argmax(-1)
        np.testing.assert_array_equal(choice, batch.experts_NLK[:, layer, 0])
