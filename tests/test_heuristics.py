"""Heuristic and baseline predictors: hand-computed values on a 3-token trace, causality, and gate-lookahead
equivalence with the real routers."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, ROUTER_PRESETS
from omegaconf import OmegaConf
from synthetic import synthetic_manifest

from speculation.config import ModelConfig, RouterConfig
from speculation.models.switch_lm import SwitchLM
from speculation.predictors import (
    HEURISTICS,
    AdaptivePredictor,
    FrequencyPredictor,
    GateLookaheadPredictor,
    LayerMinus1Predictor,
    MultiLayerPredictor,
    OraclePredictor,
    PatternPredictor,
    Predictor,
    PreviousTokenPredictor,
    RandomPredictor,
    TraceBatch,
)
from speculation.predictors.routers import RouterBank
from speculation.traces import Manifest, TraceStore
from speculation.tracing.collection import save_router_weights
from speculation.tracing.recorder import RoutingRecorder
from speculation.tracing.registry import find_adapter
from speculation.workdir import ROUTER_WEIGHTS_FILE


def previous_rows(seq_N: np.ndarray) -> np.ndarray:
    """Row of the previous token of the same sequence (rows in (seq, pos) order), else -1."""
    same = np.r_[False, seq_N[1:] == seq_N[:-1]]
    return np.where(same, np.arange(len(seq_N)) - 1, -1)


def make_batch(
    experts_NLK, gates_NLK, probs_NLE, seq_N, pos_N, hidden_NLH=None, hidden_layers=None, logits_NLE=None
) -> TraceBatch:
    probs_NLE = np.asarray(probs_NLE, np.float32)
    seq_N = np.asarray(seq_N, np.int64)
    return TraceBatch(
        experts_NLK=np.asarray(experts_NLK, np.int64),
        gates_NLK=np.asarray(gates_NLK, np.float32),
        logits_NLE=np.log(probs_NLE) if logits_NLE is None else np.asarray(logits_NLE, np.float32),
        probs_NLE=probs_NLE,
        hidden_NLH=hidden_NLH,
        hidden_layers=list(hidden_layers or []),
        seq_N=seq_N,
        pos_N=np.asarray(pos_N, np.int64),
        doc_N=seq_N.copy(),
        prev_N=previous_rows(seq_N),
    )


def take_rows(batch: TraceBatch, rows: np.ndarray) -> TraceBatch:
    """Rows of ``batch`` as a batch of their own (prev_N recomputed)."""
    hidden = None if batch.hidden_NLH is None else batch.hidden_NLH[rows]
    return make_batch(
        batch.experts_NLK[rows], batch.gates_NLK[rows], batch.probs_NLE[rows], batch.seq_N[rows], batch.pos_N[rows],
        hidden, batch.hidden_layers, batch.logits_NLE[rows],
    )  # fmt: skip


# --------------------------------------------------------------------------- the hand-made trace: N=3, L=3, E=3, K=1
# Rows 0 and 1 are one sequence, row 2 starts another. Row 1 was dropped at layer 2.
PROBS = np.array(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
        [[0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.4, 0.3, 0.3]],
        [[0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.6, 0.3, 0.1]],
    ]
)
TOP1 = np.array([[0, 1, 2], [1, 1, -1], [2, 0, 0]])


def hand_batch() -> TraceBatch:
    gates = np.where(TOP1 >= 0, np.take_along_axis(PROBS, np.maximum(TOP1, 0)[..., None], -1)[..., 0], 0)
    return make_batch(TOP1[..., None], gates[..., None], PROBS, seq_N=[0, 0, 1], pos_N=[0, 1, 0])


def fitted(predictor: Predictor, train: TraceBatch, num_experts: int = 3) -> Predictor:
    predictor.fit(train, num_experts)
    return predictor


def test_layer_minus_1_repeats_the_current_distribution() -> None:
    out = LayerMinus1Predictor().predict(hand_batch(), 0, [1, 2])
    np.testing.assert_allclose(out.probs_NDE, np.stack([PROBS[:, 0], PROBS[:, 0]], 1), atol=1e-7)
    np.testing.assert_allclose(out.confidence_ND, [[0.7, 0.7], [0.6, 0.6], [0.8, 0.8]], atol=1e-7)


def test_multi_layer_weights_are_renormalised_over_existing_layers() -> None:
    predictor, batch = MultiLayerPredictor(), hand_batch()
    np.testing.assert_allclose(predictor.predict(batch, 0, [2]).probs_NDE[:, 0], PROBS[:, 0], atol=1e-7)
    at_1 = predictor.predict(batch, 1, [1]).probs_NDE[:, 0]  # 0.4, 0.3 -> 4/7, 3/7
    np.testing.assert_allclose(at_1[2], np.array([0.23, 0.13, 0.34]) / 0.7, atol=1e-6)
    np.testing.assert_allclose(at_1, (0.4 * PROBS[:, 1] + 0.3 * PROBS[:, 0]) / 0.7, atol=1e-6)
    at_2 = predictor.predict(batch, 2, [0]).probs_NDE[:, 0]  # 0.4, 0.3, 0.2 -> /0.9
    np.testing.assert_allclose(at_2[0], np.array([0.25, 0.36, 0.29]) / 0.9, atol=1e-6)
    np.testing.assert_allclose(at_2, (0.4 * PROBS[:, 2] + 0.3 * PROBS[:, 1] + 0.2 * PROBS[:, 0]) / 0.9, atol=1e-6)


def test_frequency_is_the_add_one_smoothed_marginal_of_every_selected_slot() -> None:
    out = fitted(FrequencyPredictor(), hand_batch()).predict(hand_batch(), 0, [0, 1, 2])
    expected_DE = np.array([[2, 2, 2], [2, 3, 1], [2, 1, 2]]) / np.array([[6], [6], [5]])  # layer 2: the -1 is skipped
    np.testing.assert_allclose(out.probs_NDE, np.broadcast_to(expected_DE, (3, 3, 3)), atol=1e-7)
    np.testing.assert_allclose(out.confidence_ND[0], [1 / 3, 0.5, 0.4], atol=1e-7)
    # Both slots of a top-2 token count: experts [0, 1] and [0, -1] -> counts [2, 1, 0] + 1.
    two_slots = make_batch([[[0, 1]], [[0, -1]]], np.ones((2, 1, 2)), np.full((2, 1, 3), 1 / 3), [0, 0], [0, 1])
    out = fitted(FrequencyPredictor(), two_slots).predict(two_slots, 0, [0])
    np.testing.assert_allclose(out.probs_NDE[0, 0], [3 / 6, 2 / 6, 1 / 6], atol=1e-7)


def test_previous_token_uses_the_predecessor_and_the_prior_at_sequence_starts() -> None:
    batch = hand_batch()
    out = fitted(PreviousTokenPredictor(), batch).predict(batch, 0, [1, 2])
    prior = np.array([[2 / 6, 3 / 6, 1 / 6], [2 / 5, 1 / 5, 2 / 5]])  # frequency of layers 1 and 2
    np.testing.assert_allclose(out.probs_NDE[0], prior, atol=1e-7)  # sequence start
    np.testing.assert_allclose(out.probs_NDE[1], PROBS[0, 1:], atol=1e-7)  # row 0 at layers 1, 2
    np.testing.assert_allclose(out.probs_NDE[2], prior, atol=1e-7)  # row 2 starts sequence 1
    np.testing.assert_allclose(out.confidence_ND[1], [0.8, 0.6], atol=1e-7)


def test_pattern_counts_transitions_with_add_one_smoothing() -> None:
    batch = hand_batch()
    predictor = fitted(PatternPredictor(), batch)
    out = predictor.predict(batch, 0, [1, 2]).probs_NDE
    # layer 0 -> 1 pairs (0,1) (1,1) (2,0): row a of the table is (counts[a] + 1) / (sum + 3).
    np.testing.assert_allclose(out[:, 0], [[1 / 4, 2 / 4, 1 / 4], [1 / 4, 2 / 4, 1 / 4], [2 / 4, 1 / 4, 1 / 4]])
    # layer 0 -> 2 pairs (0,2) (2,0); row 1's target was dropped, so expert 1's row has no counts at all.
    np.testing.assert_allclose(out[:, 1], [[1 / 4, 1 / 4, 2 / 4], [1 / 3, 1 / 3, 1 / 3], [2 / 4, 1 / 4, 1 / 4]])
    out = predictor.predict(batch, 1, [1])
    np.testing.assert_allclose(out.probs_NDE[:, 0], [[1 / 4, 1 / 4, 2 / 4]] * 2 + [[2 / 4, 1 / 4, 1 / 4]])
    np.testing.assert_allclose(out.confidence_ND[:, 0], [0.5, 0.5, 0.5])
    # d = 0 is the identity; row 1 has no expert at layer 2, so it gets layer 2's top-1 marginal ([1, 0, 1] + 1).
    out = predictor.predict(batch, 2, [0]).probs_NDE[:, 0]
    np.testing.assert_allclose(out, [[0, 0, 1], [2 / 5, 1 / 5, 2 / 5], [1, 0, 0]], atol=1e-7)


def test_adaptive_weighs_pattern_and_multi_layer_by_their_confidence() -> None:
    batch = hand_batch()
    out = fitted(AdaptivePredictor(), batch).predict(batch, 1, [1])
    pattern = np.array([[1, 1, 2], [1, 1, 2], [2, 1, 1]]) / 4  # confidence 0.5 each
    multi = np.array([[0.25, 0.38, 0.07], [0.17, 0.38, 0.15], [0.23, 0.13, 0.34]]) / 0.7
    w = 0.5 / (0.5 + multi.max(-1, keepdims=True))  # rows: 0.5 / (0.5 + 0.38/0.7), ..., 0.5 / (0.5 + 0.34/0.7)
    expected = w * pattern + (1 - w) * multi
    np.testing.assert_allclose(out.probs_NDE[:, 0], expected, atol=1e-6)
    np.testing.assert_allclose(out.confidence_ND[:, 0], expected.max(-1), atol=1e-6)


def test_oracle_is_the_router_where_it_agrees_and_the_selection_where_not() -> None:
    batch = hand_batch()
    out = OraclePredictor().predict(batch, 0, [1, 2])
    np.testing.assert_allclose(out.probs_NDE[0, 0], PROBS[0, 1], atol=1e-7)  # argmax is the choice: r itself
    np.testing.assert_allclose(out.probs_NDE[1, 1], PROBS[1, 2], atol=1e-7)  # dropped: the router distribution
    np.testing.assert_allclose(out.confidence_ND, [[1, 1], [1, 0.4], [1, 1]], atol=1e-7)
    batch.experts_NLK[0, 1, 0] = 0  # a choice the distribution does not rank first (capacity, biased scores)
    out = OraclePredictor().predict(batch, 0, [1, 2])
    np.testing.assert_allclose(out.probs_NDE[0, 0], 0.999 * np.eye(3)[0] + 0.001 * PROBS[0, 1], atol=1e-7)


def test_predictors_that_need_statistics_say_so() -> None:
    for predictor in (FrequencyPredictor(), PreviousTokenPredictor(), PatternPredictor(), AdaptivePredictor()):
        with pytest.raises(RuntimeError, match="fit"):
            predictor.predict(hand_batch(), 0, [1])
    with pytest.raises(ValueError, match="lookaheads"):
        LayerMinus1Predictor().predict(hand_batch(), 1, [2])


# ---------------------------------------------------------------------------------------------- random traces
NUM_LAYERS, NUM_EXPERTS, K, HIDDEN = 4, 5, 2, 6


def random_batch(rng: np.random.Generator, num_seqs: int = 4, seq_len: int = 6) -> TraceBatch:
    n = num_seqs * seq_len
    logits = rng.normal(size=(n, NUM_LAYERS, NUM_EXPERTS)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    experts = np.argsort(-probs, -1)[..., :K]  # distinct, heaviest first
    experts[rng.random((n, NUM_LAYERS, K)) < 0.2] = -1  # some dropped slots
    gates = np.where(experts >= 0, np.sort(rng.random((n, NUM_LAYERS, K)), -1)[..., ::-1] + 0.1, 0)
    hidden = rng.normal(size=(n, NUM_LAYERS, HIDDEN)).astype(np.float32)
    seq = np.repeat(np.arange(num_seqs), seq_len)
    pos = np.tile(np.arange(seq_len), num_seqs) + 3  # chunks need not start a document
    return make_batch(experts, gates, probs, seq, pos, hidden, range(NUM_LAYERS), logits)


def perturbed(batch: TraceBatch, rows_N: np.ndarray, layers_L: np.ndarray, rng: np.random.Generator) -> TraceBatch:
    """A copy with every per-layer field (experts, gates, logits, probs, hidden) redrawn at rows x layers."""
    out = take_rows(batch, np.arange(batch.num_rows))
    where = rows_N[:, None] & layers_L[None, :]
    n = int(where.sum())
    logits = rng.normal(size=(n, NUM_EXPERTS)).astype(np.float32) * 3
    out.logits_NLE[where] = logits
    out.probs_NLE[where] = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out.experts_NLK[where] = rng.integers(-1, NUM_EXPERTS, size=(n, K))
    out.gates_NLK[where] = rng.random((n, K))
    out.hidden_NLH[where] = rng.normal(size=(n, HIDDEN))
    return out


def linear_gate_lookahead(family: str, score: str) -> GateLookaheadPredictor:
    generator = torch.Generator().manual_seed(3)
    labels = [f"decoder.{i}" for i in range(NUM_LAYERS)]
    tensors = {f"{label}.weight": torch.randn(NUM_EXPERTS, HIDDEN, generator=generator) for label in labels}
    tensors |= {f"{label}.e_score_correction_bias": torch.ones(NUM_EXPERTS) for label in labels}
    return GateLookaheadPredictor(RouterBank.from_parts(family, labels, tensors, NUM_EXPERTS, score))


CAUSAL: dict[str, Callable[[], Predictor]] = {
    **{name: cls for name, cls in HEURISTICS.items() if name not in ("gate_lookahead", "oracle")},
    "gate_lookahead": lambda: linear_gate_lookahead("mixtral", "softmax"),
    "gate_lookahead_sigmoid": lambda: linear_gate_lookahead("deepseek_v3", "sigmoid"),
}


def causality_violations(make: Callable[[], Predictor]) -> list[str]:
    """Every (check, layer) whose allowed rows changed when only forbidden data was perturbed."""
    rng = np.random.default_rng(0)
    batch, predictor = random_batch(rng), make()
    predictor.fit(random_batch(np.random.default_rng(1), num_seqs=8), NUM_EXPERTS)
    in_seq_N = batch.pos_N - 3
    violations = []
    for layer in range(NUM_LAYERS):
        lookaheads = list(range(NUM_LAYERS - layer))
        base = predictor.predict(batch, layer, lookaheads)
        assert base.probs_NDE.shape == (batch.num_rows, len(lookaheads), NUM_EXPERTS)
        assert base.probs_NDE.dtype == np.float32 and base.confidence_ND.dtype == np.float32
        np.testing.assert_allclose(base.probs_NDE.sum(-1), 1, atol=1e-5)
        assert ((base.confidence_ND >= 0) & (base.confidence_ND <= 1 + 1e-6)).all()
        # Own layers > l, on every other token of a sequence: the predecessor (which may be read at any
        # layer) stays intact, and the two parities together cover every row.
        for parity in (0, 1):
            rows = in_seq_N % 2 == parity
            other = perturbed(batch, rows, np.arange(NUM_LAYERS) > layer, rng)
            out = predictor.predict(other, layer, lookaheads)
            if not (np.array_equal(out.probs_NDE[rows], base.probs_NDE[rows])
                    and np.array_equal(out.confidence_ND[rows], base.confidence_ND[rows])):  # fmt: skip
                violations.append(f"own layers > {layer} (parity {parity})")
        # Everything of the rows after ``last``, metadata included; rows up to ``last`` must not move.
        for last in (0, 4, 9, batch.num_rows - 2):
            later = np.arange(batch.num_rows) > last
            other = perturbed(batch, later, np.ones(NUM_LAYERS, bool), rng)
            other.seq_N[later], other.pos_N[later] = other.seq_N[later] + 100, other.pos_N[later] * 7
            out = predictor.predict(other, layer, lookaheads)
            if not (np.array_equal(out.probs_NDE[~later], base.probs_NDE[~later])
                    and np.array_equal(out.confidence_ND[~later], base.confidence_ND[~later])):  # fmt: skip
                violations.append(f"rows after {last} at layer {layer}")
    return violations


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_predictions_never_read_the_future(name: str) -> None:
    assert causality_violations(CAUSAL[name]) == []


def test_the_causality_check_catches_the_oracle() -> None:
    """The oracle reads its targets: the check above must notice, or it proves nothing."""
    violations = causality_violations(OraclePredictor)
    assert any(v.startswith("own layers") for v in violations)


def test_oracle_top1_is_slot_0_wherever_an_expert_was_selected() -> None:
    batch = random_batch(np.random.default_rng(2), num_seqs=20)
    out = OraclePredictor().predict(batch, 0, range(NUM_LAYERS))
    slot0_NL = batch.experts_NLK[:, :, 0]
    chosen = slot0_NL >= 0
    assert chosen.sum() > 50
    np.testing.assert_array_equal(out.probs_NDE.argmax(-1)[chosen], slot0_NL[chosen])
    np.testing.assert_array_equal(out.confidence_ND[batch.experts_NLK.max(-1) >= 0], 1)


def test_random_is_uniform_reproducible_and_independent_of_batching() -> None:
    n, num_experts = 20_000, 8
    seq, pos = np.arange(n) // 100, np.arange(n) % 100
    batch = make_batch(np.zeros((n, 2, 1)), np.ones((n, 2, 1)), np.full((n, 2, num_experts), 1 / num_experts), seq, pos)
    out = RandomPredictor(seed=5).predict(batch, 0, [0, 1])
    for i in range(2):
        share = np.bincount(out.probs_NDE[:, i].argmax(-1), minlength=num_experts) / n
        np.testing.assert_allclose(share, 1 / num_experts, atol=0.01)  # ~4 sigma at 20k tokens
    np.testing.assert_allclose(out.probs_NDE.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(out.confidence_ND, out.probs_NDE.max(-1))
    assert not np.allclose(out.probs_NDE[:, 0], out.probs_NDE[:, 1])  # d is part of the seed
    again = RandomPredictor(seed=5).predict(batch, 0, [1])
    np.testing.assert_array_equal(again.probs_NDE[:, 0], out.probs_NDE[:, 1])
    pieces = [RandomPredictor(seed=5).predict(take_rows(batch, rows), 0, [0, 1]).probs_NDE
              for rows in (np.arange(0, 7001), np.arange(7001, n))]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(pieces), out.probs_NDE)
    assert not np.allclose(RandomPredictor(seed=6).predict(batch, 0, [0]).probs_NDE[:, 0], out.probs_NDE[:, 0])
    assert not np.allclose(RandomPredictor(seed=5).predict(batch, 1, [0]).probs_NDE[:, 0], out.probs_NDE[:, 1])


# ------------------------------------------------------------------------------------------------ gate lookahead
TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=3, num_heads=2, d_ff=32, num_experts=4, moe_every=1)


def preset(name: str) -> RouterConfig:
    node = OmegaConf.merge(OmegaConf.structured(RouterConfig), OmegaConf.load(CONF_DIR / "router" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def traced_switch_lm(router_cfg: RouterConfig, tmp_path) -> tuple[SwitchLM, TraceBatch, TraceStore]:
    """Run a tiny SwitchLM under the recorder; return it, its trace as a batch, and a store with its routers."""
    model = SwitchLM(TINY, router_cfg).eval()
    tokens, mask = torch.randint(0, 64, (3, 12)), torch.ones(3, 12, dtype=torch.bool)
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(tokens, mask)
        arrays = recorder.collect(mask)
        save_router_weights(recorder, tmp_path / ROUTER_WEIGHTS_FILE)
    adapter = find_adapter(model)
    manifest = synthetic_manifest(
        {
            "num_experts": TINY.num_experts,
            "max_experts_per_token": router_cfg.max_experts_per_token,
            "layers": recorder.layer_labels,
            **adapter.routing_meta(model),
        },
        adapter=adapter.family,
        router_weights={"file": ROUTER_WEIGHTS_FILE, "format": adapter.family},
    )
    store = TraceStore(tmp_path, Manifest.from_dict(json.loads(json.dumps(manifest))))  # as read from its file
    probs = torch.softmax(torch.from_numpy(arrays["logits"]), -1).numpy()
    seq, pos = np.repeat(np.arange(3), 12), np.tile(np.arange(12), 3)
    hidden, logits = arrays["hidden"], arrays["logits"]
    return model, make_batch(arrays["experts"], arrays["gates"], probs, seq, pos, hidden, range(3), logits), store


@pytest.mark.parametrize("router_name", ROUTER_PRESETS)
def test_gate_lookahead_reapplies_the_embedded_routers(router_name: str, tmp_path) -> None:
    cfg = preset(router_name)
    model, batch, store = traced_switch_lm(cfg, tmp_path)
    if cfg.span_length > 1:
        with pytest.warns(UserWarning, match="span"):
            predictor = GateLookaheadPredictor.from_store(store)
    else:
        predictor = GateLookaheadPredictor.from_store(store)
    # Span routers decide at the span's first token; only there is a token's own hidden state the input.
    leaders = batch.pos_N % cfg.span_length == 0
    for layer in range(3):
        out = predictor.predict(batch, layer, [0])
        chosen = (batch.experts_NLK[:, layer, 0] >= 0) & leaders
        assert chosen.sum() >= 8
        np.testing.assert_array_equal(out.probs_NDE[chosen, 0].argmax(-1), batch.experts_NLK[chosen, layer, 0])
        # both are softmaxes of float16 scores (of the router input as traced and as stored): equal to that rounding,
        # which the cosine router's large logit scale makes the widest
        np.testing.assert_allclose(out.probs_NDE[leaders, 0], batch.probs_NLE[leaders, layer], atol=1e-3)
    for layer in range(2):
        hidden = torch.from_numpy(batch.hidden_at(layer))
        with torch.no_grad():
            scores = model.routers[layer + 1].scores(hidden).half().float()  # float16, as a store keeps scores
            expected = torch.softmax(scores, -1).numpy()
        np.testing.assert_allclose(predictor.predict(batch, layer, [1]).probs_NDE[:, 0], expected, atol=1e-6)


def test_gate_lookahead_without_the_hidden_state_says_how_to_trace_it(tmp_path) -> None:
    _, batch, store = traced_switch_lm(RouterConfig(), tmp_path)
    predictor = GateLookaheadPredictor.from_store(store)
    batch.hidden_NLH, batch.hidden_layers = batch.hidden_NLH[:, :1], [0]
    predictor.predict(batch, 0, [1])
    with pytest.raises(ValueError, match=r"layer 1 .*trace\.save_hidden.*trace\.hidden_layers"):
        predictor.predict(batch, 1, [1])
    batch.hidden_NLH, batch.hidden_layers = None, []
    with pytest.raises(ValueError, match="hidden_layers"):
        predictor.predict(batch, 0, [0])


def test_gate_lookahead_hf_families_use_their_score_and_ignore_the_correction_bias() -> None:
    batch = random_batch(np.random.default_rng(4), num_seqs=2, seq_len=5)
    mixtral, deepseek = linear_gate_lookahead("mixtral", "softmax"), linear_gate_lookahead("deepseek_v3", "sigmoid")
    scores = mixtral.routers.scores(torch.from_numpy(batch.hidden_at(0)), 1).numpy()  # the same weights in both
    scores = scores.astype(np.float16).astype(np.float64)  # gate lookahead scores float16 scores, as a store keeps them
    softmax = mixtral.predict(batch, 0, [1]).probs_NDE[:, 0]
    np.testing.assert_allclose(softmax, np.exp(scores) / np.exp(scores).sum(-1, keepdims=True), atol=1e-6)
    unbiased = 1 / (1 + np.exp(-scores))  # e_score_correction_bias (all ones here) must not enter
    sigmoid = deepseek.predict(batch, 0, [1]).probs_NDE[:, 0]
    np.testing.assert_allclose(sigmoid, unbiased / unbiased.sum(-1, keepdims=True), atol=1e-6)
    switch = GateLookaheadPredictor(
        RouterBank.from_parts(
            "switch_transformers",
            ["decoder.1"],
            {
                "decoder.1.classifier.weight": torch.eye(3, 2),
                "decoder.1.classifier.bias": torch.tensor([0.0, 0.0, 1.0]),
            },
            num_experts=3,
        )
    )
    one_layer = make_batch([[[0]]], [[[1.0]]], [[[0.2, 0.3, 0.5]]], [0], [0], np.array([[[2.0, 0.0]]]), [0])
    expected = np.exp([2.0, 0.0, 1.0]) / np.exp([2.0, 0.0, 1.0]).sum()
    np.testing.assert_allclose(switch.predict(one_layer, 0, [0]).probs_NDE[0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="supported"):
        RouterBank.from_parts("llama", ["decoder.0"], {}, num_experts=3)
