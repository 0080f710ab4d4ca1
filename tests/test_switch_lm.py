"""The embedded Switch LM: 1-expert MoE == dense FFN, causality, aux losses wired into the loss."""

from __future__ import annotations

import torch

from speculation.config import ModelConfig, RouterConfig
from speculation.models.switch_lm import FeedForward, MoEFeedForward, SwitchLM

TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=4, num_heads=2, d_ff=32, num_experts=4, max_seq_len=32)


def test_one_expert_moe_equals_its_dense_ffn():
    moe = MoEFeedForward(16, 32, num_experts=1, router_cfg=RouterConfig())
    dense = FeedForward(16, 32)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 7, 16)
    out, route = moe(x)
    assert (route.gates_BTK == 1.0).all()  # softmax over one expert is exactly 1
    torch.testing.assert_close(out, dense(x), rtol=0, atol=0)


def test_moe_output_is_gate_weighted_expert_output():
    moe = MoEFeedForward(16, 32, num_experts=4, router_cfg=RouterConfig(k=2))
    x = torch.randn(2, 5, 16)
    out, route = moe(x)
    for b in range(2):
        for t in range(5):
            expected = sum(
                route.gates_BTK[b, t, s] * moe.experts[int(route.experts_BTK[b, t, s])](x[b, t]) for s in range(2)
            )
            torch.testing.assert_close(out[b, t], expected)


def test_dropped_token_gets_no_expert_output():
    moe = MoEFeedForward(16, 32, num_experts=2, router_cfg=RouterConfig(capacity_factor=0.25))
    out, route = moe(torch.randn(1, 16, 16))
    dropped = route.experts_BTK[0, :, 0] < 0
    assert dropped.any()
    assert out[0, dropped].abs().sum() == 0


def test_model_is_causal_and_padding_does_not_change_real_tokens():
    model = SwitchLM(TINY, RouterConfig()).eval()
    tokens = torch.randint(0, 64, (1, 12))
    full = model(tokens)
    prefix = model(tokens[:, :8])
    torch.testing.assert_close(full.logits_BTV[:, :8], prefix.logits_BTV, rtol=1e-5, atol=1e-5)
    for a, b in zip(full.routes, prefix.routes, strict=True):
        assert torch.equal(a.experts_BTK[:, :8], b.experts_BTK)


def test_loss_includes_router_aux_losses_with_their_coefficients():
    router_cfg = RouterConfig(load_balance_coef=0.5, z_loss_coef=0.25)
    model = SwitchLM(TINY, router_cfg)
    tokens = torch.randint(0, 64, (2, 9))
    out = model(tokens[:, :-1], targets_BT=tokens[:, 1:])
    expected_aux = torch.stack([0.5 * r.load_balance_loss + 0.25 * r.z_loss for r in out.routes]).mean()
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, out.lm_loss + expected_aux)
    assert len(out.routes) == len(TINY.moe_layers) == 2
    out.loss.backward()
    assert model.routers[0].weight.weight.grad.abs().sum() > 0  # the router learns through the gates
