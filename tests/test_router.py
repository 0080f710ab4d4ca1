"""Router variants, capacity dropping and aux losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from speculation.config import Gate, RouterConfig, Selection
from speculation.models.router import (
    Router,
    adaptive_k,
    capacity_keep_mask,
    load_balancing_loss,
    router_z_loss,
)


def axis_router(num_experts: int = 2, **cfg) -> Router:
    """A linear router on D = num_experts whose logits equal the input (identity weight)."""
    router = Router(num_experts, num_experts, RouterConfig(**cfg))
    with torch.no_grad():
        router.weight.weight.copy_(torch.eye(num_experts))
    return router.eval()


def test_load_balancing_loss_matches_switch_golden_value():
    # The value HF and flaxformer pin for Switch's auxiliary loss (test_equivalency_balancy_loss).
    probs = torch.tensor(
        [[0.35490513, 0.60419905], [0.4275843, 0.23061597], [0.32985854, 0.43953657], [0.25099766, 0.27730572],
         [0.7678207, 0.71474564]]
    )  # fmt: skip
    experts = torch.tensor([[0], [1], [1], [0], [0]])
    loss = load_balancing_loss(probs, experts, torch.ones(5, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.8741045, abs=1e-6)


def test_load_balancing_loss_hand_values_and_mask():
    uniform = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0], [1], [2], [3]])
    assert load_balancing_loss(uniform, balanced, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    zeros = torch.zeros(4, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed, zeros, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(4.0)
    # A padding row (mask False) must not count, whatever it holds.
    probs = torch.cat([collapsed, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    experts = torch.cat([zeros, torch.tensor([[3]])])
    mask = torch.tensor([True] * 4 + [False])
    assert load_balancing_loss(probs, experts, mask).item() == pytest.approx(4.0)


def test_router_z_loss_matches_switch_golden_value():
    logits = torch.tensor(
        [[-4.2124424, 3.891939, -3.6481273, 1.8849981], [0.32625437, 2.918651, 0.84758997, -4.556842],
         [-3.32062, 4.6977115, -0.15439987, 0.44086337], [3.4467149, 4.3436565, -4.7224274, -4.264637],
         [-2.224406, -2.5318158, -1.3832569, 1.1891162], [-2.320062, -0.44705987, 4.289819, -0.00662684],
         [0.99470854, -0.6992364, 0.25503993, 4.2952085], [3.5937333, -3.2408535, -4.298278, 4.426601],
         [0.7669008, 2.6588762, 2.4505413, 4.6051874], [0.23330331, -3.0845237, 0.6262374, -2.9865491],
         [0.7595146, -2.1099675, -4.155346, -2.8326452], [2.3771453, 1.004138, -3.1781673, 0.7581556]]
    )  # fmt: skip
    loss = router_z_loss(logits, torch.ones(12, dtype=torch.bool))
    assert loss.item() == pytest.approx(13.786719, abs=1e-5)
    # By hand: logsumexp([0, 0]) = ln 2.
    assert router_z_loss(torch.zeros(1, 2), torch.ones(1, dtype=torch.bool)).item() == pytest.approx(math.log(2) ** 2)


def test_capacity_keeps_first_choices_in_token_order():
    experts = torch.tensor([[0], [0], [0], [1], [0], [1]])
    keep = capacity_keep_mask(experts, num_experts=2, capacity=2)
    assert keep[:, 0].tolist() == [True, True, False, True, False, True]


def test_capacity_serves_all_first_choices_before_second_choices():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0]])
    keep = capacity_keep_mask(experts, num_experts=2, capacity=2)
    # first choices: t0->0, t1->0, t2->1 all fit; second: t0->1 fits (2nd at expert 1), t1->1 and t2->0 overflow.
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_router_drops_exactly_the_tokens_over_capacity_and_ignores_padding():
    router = axis_router(capacity_factor=0.8)  # capacity = ceil(0.8 * 5 real tokens * 1 / 2) = 2
    x = torch.tensor([[[5.0, 0], [5.0, 0], [0, 5.0], [5.0, 0], [5.0, 0], [5.0, 0]]])
    mask = torch.tensor([[True, False, True, True, True, True]])  # token 1 is padding: takes no capacity
    out = router(x, mask)
    assert out.experts_BTK[0, :, 0].tolist() == [0, -1, 1, 0, -1, -1]
    assert out.dropped_BTK[0, :, 0].tolist() == [False, False, False, False, True, True]
    assert out.gates_BTK[0, :, 0][out.experts_BTK[0, :, 0] < 0].abs().sum() == 0


def test_top1_gate_is_raw_probability_and_topk_gates_renormalise():
    x = torch.tensor([[[2.0, 1.0, 0.0]]])
    top1 = axis_router(3)(x)
    probs = torch.softmax(x, -1)
    assert top1.experts_BTK.flatten().tolist() == [0]
    assert top1.gates_BTK.flatten().item() == pytest.approx(probs[0, 0, 0].item())
    top2 = axis_router(3, k=2)(x)
    assert top2.experts_BTK.flatten().tolist() == [0, 1]
    expected = probs[0, 0, :2] / probs[0, 0, :2].sum()
    torch.testing.assert_close(top2.gates_BTK.flatten(), expected)


def test_temperature_divides_logits():
    x = torch.tensor([[[2.0, 1.0, 0.0]]])
    out = axis_router(3, temperature=2.0)(x)
    torch.testing.assert_close(out.logits_BTE, x / 2)
    torch.testing.assert_close(out.probs_BTE, torch.softmax(x / 2, -1))


def test_adaptive_k_peaked_gives_one_flat_gives_k_max():
    peaked = torch.tensor([[0.999, 0.0005, 0.0003, 0.0002]])
    flat = torch.full((1, 4), 0.25)
    assert adaptive_k(peaked, 3).tolist() == [1]
    assert adaptive_k(flat, 3).tolist() == [3]
    # Normalised entropy 0.5 of 4 experts (uniform over 2): ceil(3 * 0.5) = 2.
    assert adaptive_k(torch.tensor([[0.5, 0.5, 0.0, 0.0]]), 3).tolist() == [2]


def test_adaptive_router_marks_unused_slots():
    router = axis_router(4, selection=Selection.adaptive_k, k_max=3)
    out = router(torch.tensor([[[20.0, 0, 0, 0], [0.0, 0, 0, 0]]]))
    assert out.experts_BTK[0, 0].tolist() == [0, -1, -1]
    assert (out.experts_BTK[0, 1] >= 0).sum() == 3
    assert not out.dropped_BTK.any()
    assert out.gates_BTK[0, 1].sum().item() == pytest.approx(1.0)


def test_span_routing_is_constant_within_spans_and_causal():
    router = Router(16, 8, RouterConfig(span_length=4)).eval()
    x = torch.randn(2, 10, 16)
    out = router(x)
    experts = out.experts_BTK[..., 0]
    for start in range(0, 10, 4):
        span = experts[:, start : start + 4]
        assert (span == span[:, :1]).all()
    # The decision for a span comes from its first token only: changing later tokens changes nothing.
    x2 = x.clone()
    x2[:, 1:4] = torch.randn(2, 3, 16)
    assert torch.equal(router(x2).experts_BTK, out.experts_BTK)


def test_noisy_gate_is_random_in_training_and_deterministic_in_eval():
    router = Router(8, 4, RouterConfig(gate=Gate.noisy))
    with torch.no_grad():
        router.noise.weight.fill_(1.0)
    x = torch.randn(1, 32, 8)
    router.train()
    assert not torch.equal(router(x).logits_BTE, router(x).logits_BTE)
    router.eval()
    torch.testing.assert_close(router(x).logits_BTE, x @ router.weight.weight.t())


def test_cosine_gate_logits_are_bounded_by_the_scale():
    router = Router(8, 4, RouterConfig(gate=Gate.cosine, cosine_dim=4)).eval()
    logits = router(torch.randn(1, 16, 8) * 100).logits_BTE
    assert logits.abs().max() <= router.log_scale.exp() + 1e-4


def test_non_positive_expert_count_is_one_clear_error():
    with pytest.raises(ValueError, match="num_experts=0"):
        Router(8, 0, RouterConfig())
