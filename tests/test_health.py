"""Router health metrics on hand-made routing, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speculation.health import RouterHealth


def test_health_metrics_match_hand_computed_values():
    # 4 tokens, 1 layer, 2 slots, 4 experts. Slot assignments kept: 0, 0, 1, 0, 2 (5); dropped: 1 (token 3, slot 1).
    experts = np.array([[[0, 1]], [[0, -1]], [[0, 2]], [[-1, -1]]])
    dropped = np.zeros_like(experts, dtype=bool)
    dropped[3, 0, 1] = True
    logits = np.zeros((4, 1, 4))  # uniform routing: entropy ln 4, logsumexp = ln 4
    health = RouterHealth(["decoder.1"], num_experts=4)
    health.update(experts, logits, dropped)
    layer = health.summary()["layers"]["decoder.1"]
    load = np.array([3, 1, 1, 0]) / 5
    assert layer["expert_load"] == pytest.approx(load.tolist())
    assert layer["utilisation"] == pytest.approx(0.75)  # expert 3 never used
    assert layer["capacity_overflow_pct"] == pytest.approx(100 * 1 / 6)
    assert layer["gate_entropy"] == pytest.approx(math.log(4))
    assert layer["gate_entropy_normalised"] == pytest.approx(1.0)
    assert layer["load_variance"] == pytest.approx(np.var(4 * load))  # var of [2.4, .8, .8, 0] = 0.76
    assert layer["load_variance"] == pytest.approx(0.76)
    assert layer["load_balance_score"] == pytest.approx(1 / (4 * (0.36 + 0.04 + 0.04)))
    assert layer["z_loss"] == pytest.approx(math.log(4) ** 2)


def test_balanced_and_collapsed_extremes():
    balanced = RouterHealth(["l"], num_experts=4)
    balanced.update(np.arange(8).reshape(8, 1, 1) % 4, np.zeros((8, 1, 4)))
    collapsed = RouterHealth(["l"], num_experts=4)
    peaked = np.tile(np.array([50.0, 0, 0, 0]), (8, 1, 1))
    collapsed.update(np.zeros((8, 1, 1), dtype=int), peaked)
    b, c = balanced.summary()["layers"]["l"], collapsed.summary()["layers"]["l"]
    assert b["load_balance_score"] == pytest.approx(1.0) and b["load_variance"] == pytest.approx(0.0)
    assert c["load_balance_score"] == pytest.approx(0.25) and c["load_variance"] == pytest.approx(3.0)
    assert c["gate_entropy"] < 1e-15


def test_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    experts = rng.integers(-1, 4, size=(20, 2, 2))
    logits = rng.normal(size=(20, 2, 4))
    whole, part_a, part_b = (RouterHealth(["a", "b"], 4) for _ in range(3))
    whole.update(experts, logits)
    part_a.update(experts[:7], logits[:7])
    part_b.update(experts[7:], logits[7:])
    part_a.merge(part_b)
    merged, single = part_a.summary(), whole.summary()
    assert merged["tokens"] == single["tokens"] == 20
    assert merged["mean"] == pytest.approx(single["mean"])
    for name in ("a", "b"):
        merged_layer, single_layer = merged["layers"][name], single["layers"][name]
        assert merged_layer.keys() == single_layer.keys()
        for key, value in single_layer.items():  # pytest.approx takes no lists inside dicts: compare key by key
            assert merged_layer[key] == pytest.approx(value), key
    np.testing.assert_allclose(part_a.expert_load_matrix(), whole.expert_load_matrix())
