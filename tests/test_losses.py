"""Every loss term on tiny hand-made predictions, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from speculation.losses import (
    LOSS_TERMS,
    combine,
    confidence_loss,
    consistency_loss,
    diversity_loss,
    routing_loss,
)


def cell(*rows: list[float]) -> torch.Tensor:
    """Logits of len(rows) tokens in one sequence, one source layer, one lookahead: shape [1, T, 1, 1, E]."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None, None, :]


def mask(*values: bool) -> torch.Tensor:
    """A [1, T, 1, 1] bool mask."""
    return torch.tensor(values)[None, :, None, None]


def test_ce_is_minus_log_softmax_of_the_target():
    logits = cell([1.0, 3.0])
    target = torch.tensor([0]).reshape(1, 1, 1, 1)
    loss = routing_loss(logits, target, torch.full_like(logits, 0.5), mask(True), mode="ce")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)  # -log e^1 / (e^1 + e^3)


def test_kl_mode_with_a_zero_probability_router_entry():
    logits = cell([math.log(0.25), math.log(0.25), math.log(0.5)])  # q = (1/4, 1/4, 1/2)
    router = cell([0.5, 0.5, 0.0])
    target = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    loss = routing_loss(logits, target, router, mask(True), mode="kl")
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)  # 2 * 0.5 log(0.5 / 0.25); 0 log 0 = 0
    assert routing_loss(logits, target, cell([0.25, 0.25, 0.5]), mask(True), mode="kl").item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_unknown_routing_mode_names_value_and_choices():
    logits = cell([0.0, 0.0])
    with pytest.raises(ValueError, match=r"'mse'.*'ce'.*'kl'"):
        routing_loss(logits, torch.zeros(1, 1, 1, 1, dtype=torch.long), logits, mask(True), mode="mse")


def _masked_terms(logits, confidence, target, router, valid, pair, marginal):
    return {
        "ce": routing_loss(logits, target, router, valid, mode="ce"),
        "kl": routing_loss(logits, target, router, valid, mode="kl"),
        "confidence": confidence_loss(logits, confidence, target, valid),
        "consistency": consistency_loss(logits, pair, valid),
        "diversity": diversity_loss(logits, valid, marginal),
    }


def test_invalid_entries_change_nothing():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 2, 2, 4, generator=generator)
    confidence = torch.rand(2, 3, 2, 2, generator=generator)
    target = torch.randint(0, 4, (2, 3, 2, 2), generator=generator)
    router = torch.softmax(torch.randn(2, 3, 2, 2, 4, generator=generator), -1)
    valid = torch.rand(2, 3, 2, 2, generator=generator) > 0.3
    valid[:, :, 1, 1] = False  # l + d = 2 >= L: a whole (l, d) cell without targets
    pair = torch.tensor([[False, True, True], [False, True, False]])
    marginal = torch.softmax(torch.randn(2, 2, 4, generator=generator), -1)

    logits = logits.requires_grad_()
    reference = _masked_terms(logits, confidence, target, router, valid, pair, marginal)
    grads = torch.autograd.grad(sum(reference.values()), logits)[0]

    garbage = ~valid
    logits2 = torch.where(garbage[..., None], torch.tensor(float("nan")), logits.detach()).requires_grad_()
    confidence2 = torch.where(garbage, 0.0, confidence)
    target2 = torch.where(garbage, -1, target)
    router2 = torch.where(garbage[..., None], torch.tensor(float("inf")), router)
    marginal2 = marginal.clone()
    marginal2[1, 1] = float("nan")  # the cell without any valid token
    perturbed = _masked_terms(logits2, confidence2, target2, router2, valid, pair, marginal2)
    grads2 = torch.autograd.grad(sum(perturbed.values()), logits2)[0]

    for name, value in reference.items():
        assert torch.isfinite(value), name
        assert perturbed[name].item() == pytest.approx(value.item(), rel=1e-6), name
    torch.testing.assert_close(grads2, grads)
    assert (grads2[garbage] == 0).all()


def test_empty_mask_gives_zero_not_nan():
    logits = cell([1.0, 2.0])
    target = torch.tensor([1]).reshape(1, 1, 1, 1)
    assert routing_loss(logits, target, logits, mask(False)).item() == 0.0
    assert confidence_loss(logits, torch.full((1, 1, 1, 1), 0.5), target, mask(False)).item() == 0.0


def test_confidence_bce_by_hand_and_no_gradient_through_correctness():
    logits = cell([0.0, 2.0, 1.0], [3.0, 0.0, 1.0]).requires_grad_()  # argmax 1 (right), argmax 0 (wrong)
    target = torch.tensor([1, 2]).reshape(1, 2, 1, 1)
    confidence = torch.tensor([0.8, 0.3]).reshape(1, 2, 1, 1).requires_grad_()
    loss = confidence_loss(logits, confidence, target, mask(True, True))
    assert loss.item() == pytest.approx((-math.log(0.8) - math.log(0.7)) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad is None
    # d/dc of the mean: -1 / (2 c) for the right token, 1 / (2 (1 - c)) for the wrong one
    torch.testing.assert_close(confidence.grad.flatten(), torch.tensor([-1 / 1.6, 1 / 1.4]))


def test_consistency_by_hand():
    logits = cell([0.0, 0.0], [math.log(3.0), 0.0])  # q = (1/2, 1/2) then (3/4, 1/4)
    both = mask(True, True)
    pair = torch.tensor([[False, True]])
    assert consistency_loss(logits, pair, both).item() == pytest.approx(2 * 0.25**2, rel=1e-6)
    same = cell([0.3, -1.0], [0.3, -1.0])
    assert consistency_loss(same, pair, both).item() == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss(logits, torch.tensor([[False, False]]), both).item() == 0.0  # different sequences
    assert consistency_loss(logits, pair, mask(True, False)).item() == 0.0  # t has no target
    assert consistency_loss(logits, torch.tensor([[True, True]]), both).item() == pytest.approx(0.125)  # t=0 ignored


def test_diversity_zero_when_batch_mean_matches_marginal_and_hand_value_otherwise():
    logits = cell([math.log(3.0), 0.0], [0.0, math.log(3.0)])  # (3/4, 1/4) and (1/4, 3/4): mean (1/2, 1/2)
    both = mask(True, True)
    half = torch.tensor([[[0.5, 0.5]]])
    assert diversity_loss(logits, both, half).item() == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[[0.8, 0.2]]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert diversity_loss(logits, both, skewed).item() == pytest.approx(expected, rel=1e-6)
    one_hot = torch.tensor([[[1.0, 0.0]]])  # 0 log 0 = 0
    assert diversity_loss(logits, both, one_hot).item() == pytest.approx(math.log(2.0), rel=1e-6)
    # only the first token valid: mean (3/4, 1/4), so KL(half || mean) = 0.5 log(2/3) + 0.5 log 2
    assert diversity_loss(logits, mask(True, False), half).item() == pytest.approx(
        0.5 * math.log(2 / 3) + 0.5 * math.log(2), rel=1e-6
    )


def test_diversity_averages_over_cells_with_valid_tokens_only():
    logits = torch.zeros(1, 2, 1, 2, 2)  # uniform predictions, lookaheads d = 1, 2
    logits[0, :, 0, 1] = 5.0  # d = 2 predictions stay uniform too, but its cell has no valid token
    valid = torch.tensor([True, True])[None, :, None, None].repeat(1, 1, 1, 2)
    valid[..., 1] = False
    marginal = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert diversity_loss(logits, valid, marginal).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_losses_reduce_in_float32():
    logits = cell([1.0, 3.0]).to(torch.bfloat16)
    target = torch.tensor([0]).reshape(1, 1, 1, 1)
    assert routing_loss(logits, target, logits, mask(True)).dtype == torch.float32
    assert diversity_loss(logits, mask(True), torch.tensor([[[0.5, 0.5]]])).dtype == torch.float32


def test_combine_weights_terms_and_skips_zero_weights():
    terms = {"routing": torch.tensor(2.0), "confidence": torch.tensor(3.0), "consistency": torch.tensor(float("nan"))}
    total = combine(terms, {"routing": 1.0, "confidence": 0.5, "consistency": 0.0})
    assert total.item() == pytest.approx(3.5)
    assert combine(terms, {"confidence": 2.0}).item() == pytest.approx(6.0)  # absent weight = 0
    assert set(LOSS_TERMS) == {"routing", "confidence", "consistency", "diversity"}


@pytest.mark.parametrize(
    ("terms", "weights", "message"),
    [
        ({"routing": torch.tensor(1.0)}, {"routnig": 1.0}, "routnig"),
        ({"routing": torch.tensor(1.0)}, {"routing": 1.0, "diversity": 0.1}, "diversity"),
        ({"routing": torch.tensor(1.0), "entropy": torch.tensor(1.0)}, {"routing": 1.0}, "entropy"),
        ({"routing": torch.tensor(1.0)}, {"routing": -1.0}, "routing"),
        ({"routing": torch.tensor(1.0)}, {"routing": 0.0}, "zero"),
    ],
)
def test_combine_errors_name_the_term(terms, weights, message):
    with pytest.raises(ValueError, match=message):
        combine(terms, weights)


@pytest.mark.parametrize("term", ["ce", "kl", "confidence", "consistency", "diversity"])
def test_a_few_adam_steps_lower_each_term(term):
    generator = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 2)  # a 4-token batch, L = 3, D = 2
    logits = torch.randn(*shape, 4, generator=generator).requires_grad_()
    raw_confidence = torch.randn(*shape, generator=generator).requires_grad_()
    target = torch.randint(0, 4, shape, generator=generator)
    router = torch.softmax(2 * torch.randn(*shape, 4, generator=generator), -1)
    layer = torch.arange(3)[:, None]
    lookahead = torch.arange(1, 3)[None, :]
    valid = (layer + lookahead < 3).expand(shape).clone()
    pair = torch.tensor([[False, True, True, True]])
    marginal = torch.softmax(torch.randn(3, 2, 4, generator=generator), -1)

    def loss() -> torch.Tensor:
        if term in ("ce", "kl"):
            return routing_loss(logits, target, router, valid, mode=term)
        if term == "confidence":
            return confidence_loss(logits, torch.sigmoid(raw_confidence), target, valid)
        if term == "consistency":
            return consistency_loss(logits, pair, valid)
        return diversity_loss(logits, valid, marginal)

    optimizer = torch.optim.Adam([logits, raw_confidence], lr=0.1)
    initial = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert initial > 0
    assert loss().item() < 0.5 * initial


def test_weights_shift_the_routing_loss_towards_heavy_tokens():
    logits = cell([0.0, 0.0], [math.log(3.0), 0.0])  # token 0: q(0) = 1/2; token 1: q(0) = 3/4
    target = torch.zeros(1, 2, 1, 1, dtype=torch.long)
    nll = [math.log(2.0), math.log(4 / 3)]
    plain = routing_loss(logits, target, logits, mask(True, True))
    assert plain.item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    weight = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1)  # token 0 a would-be miss with miss_weight = 2
    weighted = routing_loss(logits, target, logits, mask(True, True), weight_BTLD=weight)
    assert weighted.item() == pytest.approx((3 * nll[0] + nll[1]) / 4, rel=1e-6)
    assert routing_loss(logits, target, logits, mask(True, False), weight_BTLD=weight).item() == pytest.approx(nll[0])
