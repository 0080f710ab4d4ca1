"""The simulator's event loop: hand-made access sequences with exact hit/miss/stall figures, the eviction rules'
properties (Belady never misses more than LRU or LFU) and the timing identities (infinite link = pure compute)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speculation.cache import kernel
from speculation.cache.plans import issue_layers, source_layers

HITS, LATE, MISSES, PREFETCHES, WASTED, STALL, COMPUTE = range(7)


def run(experts_TLK, eviction, capacity, plan=None, issue=None, num_experts=None, copy=1.0, non_expert=0.0,
        expert=0.0, head=0.0, predictor=0.0):  # fmt: skip
    experts_TLK = np.asarray(experts_TLK, dtype=np.int32)
    num_layers = experts_TLK.shape[1]
    plan = np.full((*experts_TLK.shape[:2], 1), -1) if plan is None else np.asarray(plan, dtype=np.int32)
    issue = issue_layers(num_layers, num_layers) if issue is None else np.asarray(issue, dtype=np.int64)
    num_experts = num_experts or int(experts_TLK.max()) + 1
    token_s, counters, _, _ = kernel.simulate(
        experts_TLK, plan, issue, num_experts, capacity, kernel.EVICTION_CODES[eviction], copy, non_expert, expert,
        head, predictor,
    )  # fmt: skip
    return token_s, counters


def one_layer(sequence: list[int]) -> np.ndarray:
    return np.array(sequence)[:, None, None]


@pytest.mark.parametrize(
    ("sequence", "eviction", "hits", "misses"),
    [
        # capacity 2. LRU: 0m 1m 0h 2m(evicts 1) 1m(evicts 0)
        ([0, 1, 0, 2, 1], "lru", 1, 4),
        # LRU evicts 0 (used at t=1) for 2, LFU evicts 1 (used once); 0 then hits under LFU only
        ([0, 0, 1, 2, 0], "lru", 1, 4),
        ([0, 0, 1, 2, 0], "lfu", 2, 3),
        # LRU and LFU (all counts 1, ties go to the least recent) miss every time; Belady keeps 0 for t=3
        ([0, 1, 2, 0, 1], "lru", 0, 5),
        ([0, 1, 2, 0, 1], "lfu", 0, 5),
        ([0, 1, 2, 0, 1], "belady", 1, 4),
    ],
)
def test_hand_made_sequences_give_exact_hits_misses_and_stalls(sequence, eviction, hits, misses):
    token_s, counters = run(one_layer(sequence), eviction, capacity=2, copy=3.0, non_expert=1.0, expert=0.5)
    assert counters[HITS] == hits and counters[MISSES] == misses and counters[LATE] == 0
    # on demand, every miss stalls for one whole copy (the link is idle whenever the GPU waits)
    assert counters[STALL] == pytest.approx(3.0 * misses)
    assert token_s.sum() == pytest.approx(len(sequence) * 1.5 + 3.0 * misses)


def test_a_prefetch_hides_part_of_the_copy_and_queues_behind_the_demand_copy():
    experts = [[[0], [1]]]  # one token, two layers; oracle prefetch of layer 1 issued at layer 0
    kwargs = dict(eviction="lru", capacity=2, num_experts=2, copy=3.0, non_expert=1.0)
    token_s, counters = run(experts, plan=np.array(experts), issue=issue_layers(2, 1), **kwargs)
    # layer 0: router at t=1, demand copy 1..4, prefetch queued 4..7; layer 1 router at t=5, waits until 7
    assert token_s[0] == pytest.approx(7.0)
    assert list(counters[:WASTED]) == [0, 1, 1, 1]  # hits, late, misses, prefetches
    assert counters[STALL] == pytest.approx(3.0 + 2.0)
    on_demand, _ = run(experts, **kwargs)
    assert on_demand[0] == pytest.approx(8.0)  # the second copy starts only at layer 1's router (t=5)


def test_a_wrong_prefetch_is_wasted_and_costs_link_time():
    experts = np.array([[[0], [1]]])
    plan = np.array([[[-1], [0]]])  # predicts expert 0 for layer 1; the router picks 1
    token_s, counters = run(experts, "lru", 3, plan=plan, issue=issue_layers(2, 1), num_experts=2, copy=3.0,
                            non_expert=1.0)  # fmt: skip
    assert counters[PREFETCHES] == 1 and counters[WASTED] == 1 and counters[MISSES] == 2
    # layer 1's demand copy queues behind the useless prefetch: 4..7 prefetch, 7..10 demand
    assert token_s[0] == pytest.approx(10.0)


def test_prediction_aware_eviction_keeps_the_predicted_expert():
    # 3 layers, capacity 2. Token 0 loads (layer 0, e0) and (layer 2, e0). Token 1: layer 0 hits e0 and predicts
    # e0 for its layer 2 (resident: nothing to copy); layer 1 misses e1. LRU evicts the least recent, (2, e0), which
    # layer 2 then misses; the prediction-aware rule protects it and evicts (0, e0) instead.
    experts = np.array([[[0], [-1], [0]], [[0], [1], [0]]])
    plan = np.full((2, 3, 1), -1)
    plan[1, 2, 0] = 0
    kwargs = dict(capacity=2, plan=plan, issue=issue_layers(3, 2), num_experts=2)
    lru = run(experts, "lru", **kwargs)[1]
    predicted = run(experts, "predicted", **kwargs)[1]
    assert (lru[HITS], lru[MISSES]) == (1, 4)
    assert (predicted[HITS], predicted[MISSES]) == (2, 3)
    assert lru[PREFETCHES] == predicted[PREFETCHES] == 0


def test_an_infinite_link_makes_on_demand_pure_compute():
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, size=(500, 6, 2)).astype(np.int32)
    experts[rng.random(experts.shape) < 0.1] = -1  # dropped slots cost nothing
    token_s, counters = run(experts, "lru", 12, num_experts=8, copy=0.0, non_expert=1e-4, expert=2e-5, head=5e-5)
    computed = (experts >= 0).sum(axis=(1, 2))
    assert np.allclose(token_s, 6 * 1e-4 + computed * 2e-5 + 5e-5)
    assert counters[STALL] == 0.0


def test_an_unbounded_cache_copies_every_used_expert_exactly_once():
    rng = np.random.default_rng(1)
    experts = rng.integers(0, 8, size=(300, 4, 1)).astype(np.int32)
    _, counters = run(experts, "lru", 4 * 8, plan=experts, issue=issue_layers(4, 2), num_experts=8)
    distinct = len({(layer, e) for layer in range(4) for e in experts[:, layer, 0]})
    assert counters[MISSES] + counters[PREFETCHES] == distinct and counters[WASTED] == 0


@settings(max_examples=60, deadline=None)
@given(
    sequence=st.lists(st.integers(0, 5), min_size=1, max_size=60),
    capacity=st.integers(1, 5),
)
def test_belady_never_misses_more_than_lru_or_lfu(sequence, capacity):
    experts = one_layer(sequence)
    misses = {ev: run(experts, ev, capacity, num_experts=6)[1][MISSES] for ev in ("lru", "lfu", "belady")}
    assert misses["belady"] <= misses["lru"] and misses["belady"] <= misses["lfu"]


def test_no_policy_beats_pure_compute_and_on_demand_time_is_compute_plus_misses_times_copy():
    rng = np.random.default_rng(2)
    experts = rng.integers(0, 8, size=(400, 6, 1)).astype(np.int32)
    timing = dict(copy=4e-4, non_expert=1e-4, expert=2e-5, head=5e-5)
    compute = 6 * (1e-4 + 2e-5) + 5e-5
    for eviction in kernel.EVICTION_CODES:
        token_s, counters = run(experts, eviction, 24, num_experts=8, **timing)
        assert token_s.sum() == pytest.approx(400 * compute + counters[MISSES] * 4e-4)
        for lookahead in (1, 2, 3):
            plan = experts  # the oracle: the router's real choice
            token_s, _ = run(experts, eviction, 24, plan=plan, issue=issue_layers(6, lookahead), num_experts=8,
                             **timing)  # fmt: skip
            assert token_s.mean() >= compute - 1e-12


@pytest.mark.parametrize("cost_aware", [False, True])
@pytest.mark.parametrize("eviction", list(kernel.EVICTION_CODES))
def test_the_recorded_schedule_replays_to_the_same_cache(eviction, cost_aware):
    """The engine replays ``copies`` into GPU slots; every access must then find its expert in the slot it reads."""
    rng = np.random.default_rng(3)
    num_tokens, num_layers, num_experts, capacity = 300, 4, 6, 10
    experts = rng.integers(0, num_experts, size=(num_tokens, num_layers, 2)).astype(np.int32)
    experts[..., 1] = (experts[..., 0] + 1 + rng.integers(0, num_experts - 1, size=experts.shape[:2])) % num_experts
    plan = rng.integers(-1, num_experts, size=(num_tokens, num_layers, 3, 2)).astype(np.int32)  # noisy predictions
    probs = rng.random(plan.shape).astype(np.float32)
    sources = source_layers(num_layers, 3, multi_horizon=True)
    _, counters, copies, slot_TLK = kernel.simulate(
        experts, plan, sources, num_experts, capacity, kernel.EVICTION_CODES[eviction], 1e-3, 1e-4, 2e-5, 0.0, 0.0,
        True, False, probs, cost_aware, 2,
    )  # fmt: skip
    assert counters[PREFETCHES] > 0
    assert (copies[:, 1] == 0).sum() == counters[MISSES] and (copies[:, 1] == 1).sum() == counters[PREFETCHES]
    assert copies[:, 3].max() < capacity and np.all(np.diff(copies[:, 0]) >= 0)  # slots in range, issue order
    content = np.full(capacity, -1)
    pending = iter(copies.tolist())
    op = next(pending, None)
    for t in range(num_tokens):
        for layer in range(num_layers):
            pos = t * num_layers + layer
            while op is not None and op[0] == pos and op[1] == 0:  # this layer's demand copies come first
                content[op[3]] = op[2]
                op = next(pending, None)
            for k in range(2):
                assert content[slot_TLK[t, layer, k]] == layer * num_experts + experts[t, layer, k]
            while op is not None and op[0] == pos:  # then the prefetches issued at this layer
                assert op[1] == 1
                content[op[3]] = op[2]
                op = next(pending, None)
    assert op is None


def test_the_clairvoyant_oracle_skips_a_prefetch_that_evicts_a_sooner_use():
    # capacity 3, layers 0..2. Token 1 prefetches (layer 2, e1) at layer 0; LRU's victim is (layer 1, e0), which
    # token 1 needs at layer 1, before the prefetched expert: the oracle skips that prefetch, LRU alone does not.
    experts = np.array([[[0], [0], [0]], [[0], [0], [1]]])
    plan = experts  # the oracle: the router's real choice
    args = (experts.astype(np.int32), plan, issue_layers(3, 2), 2, 3, kernel.EVICTION_CODES["lru"], 3.0, 1.0, 0.0,
            0.0, 0.0, False)  # fmt: skip
    blind_s, blind, _, _ = kernel.simulate(*args, False)
    seer_s, seer, _, _ = kernel.simulate(*args, True)
    # token 0: layer 0 missed, layers 1 and 2 prefetched. Token 1: the blind prefetch of (2, e1) evicts (1, e0),
    # missed at layer 1; the oracle keeps (1, e0) and fetches (2, e1) on demand: one copy less for the same misses
    assert (blind[MISSES], blind[PREFETCHES]) == (2, 3)
    assert (seer[MISSES], seer[PREFETCHES]) == (2, 2)
    assert seer_s.sum() <= blind_s.sum()


def aware(experts, plan, probs, capacity, *, num_experts, lookahead=1, budget=1, eviction="lru", copy=3.0,
          non_expert=1.0, expert=0.0, record=False):  # fmt: skip
    """A cost-aware replay of single-source candidates ``plan`` [T, L, R] with probabilities ``probs``."""
    experts = np.asarray(experts, dtype=np.int32)
    return kernel.simulate(
        experts, np.asarray(plan, dtype=np.int32), issue_layers(experts.shape[1], lookahead), num_experts, capacity,
        kernel.EVICTION_CODES[eviction], copy, non_expert, expert, 0.0, 0.0, record, False,
        np.asarray(probs, dtype=np.float32), True, budget,
    )  # fmt: skip


def test_worth_copying_weighs_the_saving_against_the_wrong_copy_and_the_victim():
    # idle link, needed 2 after issue, copy 3: right saves 2 of the 3 stalled, wrong delays the demand copy by 1
    assert kernel.worth_copying(0.34, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0)  # 0.34 · 2 >= 0.66 · 1
    assert not kernel.worth_copying(0.33, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0)  # 0.66 < 0.67
    # link busy until 2: the copy cannot start before the demand copy would, so it saves nothing and risks 3
    assert not kernel.worth_copying(0.9, 0.0, 2.0, 2.0, 3.0, 0.0, 0.0)
    assert kernel.worth_copying(1.0, 0.0, 2.0, 2.0, 3.0, 0.0, 0.0)  # certain: ties go to the copy
    # a lead longer than the copy: a wrong copy still holds the link a busy share (0.5) of one copy; a victim
    # likely to be needed (0.5) costs half a copy more when the copy is wrong
    assert kernel.worth_copying(0.34, 0.0, 5.0, 0.0, 3.0, 0.5, 0.0)  # 0.34 · 3 >= 0.66 · 1.5
    assert not kernel.worth_copying(0.34, 0.0, 5.0, 0.0, 3.0, 0.5, 0.5)  # 1.02 < 0.66 · 3
    assert not kernel.worth_copying(float("nan"), 0.0, 5.0, 0.0, 3.0, 0.0, 0.0)  # nothing predicted


def test_the_cost_aware_policy_skips_a_resident_top1_and_prefetches_the_second_choice():
    # two tokens, two layers. Token 0 loads (layer 1, e0). Token 1's prediction for layer 1: e0 (0.6, resident)
    # then e1 (0.4); the router picks e1. A fixed top-1 plan copies nothing; the cost-aware one copies e1.
    experts = [[[0], [0]], [[0], [1]]]
    plan = [[[-1, -1], [0, 1]], [[-1, -1], [0, 1]]]
    probs = [[[np.nan, np.nan], [1.0, 0.0]], [[np.nan, np.nan], [0.6, 0.4]]]
    _, counters, _, _ = aware(experts, plan, probs, 4, num_experts=2, copy=1.0, non_expert=2.0)
    assert (counters[PREFETCHES], counters[MISSES], counters[HITS]) == (2, 1, 3)  # only token 0's layer 0 misses
    fixed = run(experts, "lru", 4, plan=np.array(plan)[:, :, :1], issue=issue_layers(2, 1), num_experts=2, copy=1.0,
                non_expert=2.0)[1]  # fmt: skip
    assert (fixed[PREFETCHES], fixed[MISSES]) == (1, 2)  # token 1's layer 1 missed


def test_the_cost_aware_policy_refuses_a_low_probability_copy_when_the_link_is_busy():
    # three layers, lookahead 2, copy 2, non-expert work 1 per layer. Busy: layer 0 misses (link 1..3), a certain
    # prediction for layer 1 is copied (3..5), and layer 2 (needed at 5) is predicted with p = 0.9: its copy would
    # start at 5, when a demand copy would, so it saves nothing: refused. Idle (layer 0 hits, nothing else queued):
    # layer 2 predicted with p = 0.3, needed 2 after issue, is copied (0.3 · 2 saved >= 0.7 · the busy share of 2).
    nan = np.nan
    busy = aware([[[0], [0], [1]]], [[[-1], [0], [1]]], [[[nan], [1.0], [0.9]]], 6, num_experts=2, lookahead=2,
                 copy=2.0, record=True)  # fmt: skip
    # the demand copy of (0, e0), the prefetch of (1, e0), then layer 2's demand copy of (2, e1)
    assert busy[2][:, 1:3].tolist() == [[0, 0], [1, 2], [0, 5]]
    assert (busy[1][PREFETCHES], busy[1][MISSES]) == (1, 2)
    plan = [[[-1], [-1], [-1]], [[-1], [-1], [1]]]
    probs = [[[nan], [nan], [nan]], [[nan], [nan], [0.3]]]
    idle = aware([[[0], [-1], [-1]], [[0], [-1], [1]]], plan, probs, 6, num_experts=2, lookahead=2, copy=2.0,
                 record=True)  # fmt: skip
    assert idle[2][:, 1:3].tolist() == [[0, 0], [1, 5]]  # the prefetch of (2, e1)
    assert (idle[1][PREFETCHES], idle[1][MISSES], idle[1][HITS]) == (1, 1, 2)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "predicted", "expected"])
def test_one_hot_true_predictions_make_the_cost_aware_policy_the_oracles_schedule(eviction):
    rng = np.random.default_rng(4)
    experts = rng.integers(0, 8, size=(400, 6, 1)).astype(np.int32)
    probs = np.ones(experts.shape, dtype=np.float32)
    timing = dict(copy=4e-4, non_expert=1e-4, expert=2e-5)
    for capacity in (12, 24, 48):
        oracle_s, oracle, oracle_copies, _ = kernel.simulate(
            experts, experts, issue_layers(6, 2), 8, capacity, kernel.EVICTION_CODES[eviction], 4e-4, 1e-4, 2e-5,
            0.0, 0.0, True, False, probs,
        )  # fmt: skip
        aware_s, counted, copies, _ = aware(experts, experts, probs, capacity, num_experts=8, lookahead=2,
                                            eviction=eviction, record=True, **timing)  # fmt: skip
        assert np.array_equal(copies, oracle_copies) and np.allclose(aware_s, oracle_s)
        assert np.array_equal(counted, oracle)
