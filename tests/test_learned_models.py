"""Learned predictors: shapes, causality by perturbation, masking, padding, gradients, fusion weights, learnability.

Shape legend as in :mod:`speculation.predictors.learned`: B rows, T tokens, L layers, E experts, H hidden width,
D lookaheads, S fusion sources.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speculation.config.predictor import PredictorConfig, PredictorKind
from speculation.predictors.learned import (
    HierarchicalModel,
    PredictorInputs,
    PredictorOutputs,
    TransformerModel,
    build_model,
)
from speculation.predictors.routers import random_bank

B, T, L, E, H, D = 2, 6, 4, 5, 8, 2
MODEL_KINDS = [str(kind) for kind in PredictorKind]
# Every kind without and with gate lookahead (input and prior); the two single modes on one kind.
VARIANTS = [*(f"{kind}/none" for kind in MODEL_KINDS), *(f"{kind}/both" for kind in MODEL_KINDS),
            "contextual/input", "contextual/prior"]  # fmt: skip
SEES_OTHER_TOKENS = {"transformer", "hierarchical"}  # contextual and probe read the current token only


def tiny_config(kind: str, **overrides) -> PredictorConfig:
    fields = dict(
        d_model=16, max_lookahead=D, context_layers=2, num_heads=2, num_blocks=2, dropout=0.0, max_positions=16
    )
    return PredictorConfig(kind=kind, **{**fields, **overrides})


def tiny_model(variant: str, **overrides) -> nn.Module:
    """``variant``: a kind, or ``kind/gate_lookahead`` (random routers of the tiny geometry when it is not none)."""
    kind, _, gate = variant.partition("/")
    cfg = tiny_config(kind, gate_lookahead=gate or "none", **overrides)
    routers = random_bank(L, E, H, seed=7) if cfg.uses_routers else None
    return build_model(L, E, H, cfg, routers).eval()


def random_inputs(masked: bool = False, generator: torch.Generator | None = None) -> PredictorInputs:
    probs_BTLE = torch.softmax(3 * torch.randn(B, T, L, E, generator=generator), dim=-1)
    hidden_BTLH = torch.randn(B, T, L, H, generator=generator)
    masked_BTL = torch.rand(B, T, L, generator=generator) < 0.3 if masked else None
    return PredictorInputs(probs_BTLE, hidden_BTLH, torch.ones(B, T, dtype=torch.bool), masked_BTL)


def forbidden_BTL(b: int, t: int, layer: int) -> torch.Tensor:
    """What output [b, t, layer] must not read: other rows, later tokens, and token t's layers > layer."""
    forbidden_BTL = torch.ones(B, T, L, dtype=torch.bool)
    forbidden_BTL[b, :t] = False
    forbidden_BTL[b, t, : layer + 1] = False
    return forbidden_BTL


def perturb(inputs: PredictorInputs, where_BTL: torch.Tensor, seed: int) -> PredictorInputs:
    """Fresh random probs, hidden states and mask flags at ``where_BTL``; the rest unchanged."""
    other = random_inputs(masked=inputs.masked_BTL is not None, generator=torch.Generator().manual_seed(seed))
    where_BTL1 = where_BTL[..., None]
    masked_BTL = None
    if inputs.masked_BTL is not None:
        masked_BTL = torch.where(where_BTL, other.masked_BTL, inputs.masked_BTL)
    return PredictorInputs(
        torch.where(where_BTL1, other.probs_BTLE, inputs.probs_BTLE),
        torch.where(where_BTL1, 10 * other.hidden_BTLH, inputs.hidden_BTLH),
        inputs.mask_BT,
        masked_BTL,
    )


def entry_change(model: nn.Module, inputs: PredictorInputs, changed: PredictorInputs, b: int, t: int, layer: int):
    """Largest change of output [b, t, layer] (logits, confidence, fusion weights) between the two inputs."""
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    pairs = [(before.logits_BTLDE, after.logits_BTLDE), (before.confidence_BTLD, after.confidence_BTLD)]
    if before.fusion_weights_BTLS is not None:
        pairs.append((before.fusion_weights_BTLS, after.fusion_weights_BTLS))
    return max(float((x[b, t, layer] - y[b, t, layer]).abs().max()) for x, y in pairs)


class LeakyModel(nn.Module):
    """Reads token t's next layer: the causality check must catch it."""

    def forward(self, inputs: PredictorInputs) -> PredictorOutputs:
        logits_BTLE = inputs.probs_BTLE.roll(-1, dims=2)
        logits_BTLDE = logits_BTLE[:, :, :, None].expand(-1, -1, -1, D, -1)
        return PredictorOutputs(logits_BTLDE, torch.sigmoid(logits_BTLDE.sum(-1)))


# ------------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_and_ranges(variant: str) -> None:
    kind = variant.split("/")[0]
    out = tiny_model(variant)(random_inputs(masked=True))
    assert out.logits_BTLDE.shape == (B, T, L, D, E)
    assert out.confidence_BTLD.shape == (B, T, L, D)
    assert out.logits_BTLDE.dtype == out.confidence_BTLD.dtype == torch.float32
    assert torch.isfinite(out.logits_BTLDE).all()
    assert ((out.confidence_BTLD > 0) & (out.confidence_BTLD < 1)).all()
    assert (out.fusion_weights_BTLS is not None) == (kind == "hierarchical")


def test_default_models_are_small() -> None:
    for kind in MODEL_KINDS:
        num_params = sum(p.numel() for p in build_model(6, 8, 128, PredictorConfig(kind=kind)).parameters())
        low = 5_000 if kind == "probe" else 50_000  # the probe is the cost baseline: two linear layers
        assert low <= num_params <= 200_000, (kind, num_params)


# ----------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_by_perturbation(variant: str, masked: bool) -> None:
    """Every input, the gate lookahead's included (it reads the perturbed hidden states), stays causal."""
    model = tiny_model(variant)
    inputs = random_inputs(masked=masked)
    for b in range(B):
        for t in range(T):
            for layer in range(L):
                changed = perturb(inputs, forbidden_BTL(b, t, layer), seed=100 * t + layer)
                assert entry_change(model, inputs, changed, b, t, layer) < 1e-5, (b, t, layer)


def test_causality_check_catches_a_leak() -> None:
    inputs = random_inputs()
    changed = perturb(inputs, forbidden_BTL(0, 2, 1), seed=1)
    assert entry_change(LeakyModel(), inputs, changed, 0, 2, 1) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_reads_what_it_may(variant: str) -> None:
    """The allowed inputs matter: token t's layer l, and (transformer, hierarchical) earlier tokens' later layers."""
    kind = variant.split("/")[0]
    model, inputs = tiny_model(variant), random_inputs()
    current_BTL = torch.zeros(B, T, L, dtype=torch.bool)
    current_BTL[0, 3, 1] = True
    assert entry_change(model, inputs, perturb(inputs, current_BTL, seed=2), 0, 3, 1) > 1e-4
    earlier_BTL = torch.zeros(B, T, L, dtype=torch.bool)
    earlier_BTL[0, :3, L - 1] = True  # layers above l = 0, but of earlier tokens: allowed
    change = entry_change(model, inputs, perturb(inputs, earlier_BTL, seed=3), 0, 3, 0)
    if kind in SEES_OTHER_TOKENS:
        assert change > 1e-4
    else:
        assert change == 0  # uses no other token


# --------------------------------------------------------------------------------------------- masking, padding


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_masking_changes_only_what_it_hides(kind: str) -> None:
    model, inputs = tiny_model(kind), random_inputs()

    def run(masked_BTL: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(
                PredictorInputs(inputs.probs_BTLE, inputs.hidden_BTLH, inputs.mask_BT, masked_BTL)
            ).logits_BTLDE

    with torch.no_grad():
        plain_BTLDE = model(inputs).logits_BTLDE
    nothing_BTL = torch.zeros(B, T, L, dtype=torch.bool)
    torch.testing.assert_close(run(nothing_BTL), plain_BTLDE)
    one_BTL = nothing_BTL.clone()
    one_BTL[0, 2, 1] = True
    one_BTLDE = run(one_BTL)
    assert (one_BTLDE[0, 2, 1] - plain_BTLDE[0, 2, 1]).abs().max() > 1e-4  # token 2 at layer 1 reads it
    torch.testing.assert_close(one_BTLDE[0, 2, 0], plain_BTLDE[0, 2, 0])  # layer 0 must not
    torch.testing.assert_close(one_BTLDE[1], plain_BTLDE[1])  # nor the other row
    if kind in SEES_OTHER_TOKENS:  # later tokens read every layer of token 2
        upper_BTL = nothing_BTL.clone()
        upper_BTL[0, 2, L - 1] = True
        assert (run(upper_BTL)[0, 3, 0] - plain_BTLDE[0, 3, 0]).abs().max() > 1e-4
    assert torch.isfinite(run(torch.ones_like(nothing_BTL))).all()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_padding_never_reaches_real_tokens(kind: str) -> None:
    model, inputs = tiny_model(kind), random_inputs(masked=True)
    mask_BT = inputs.mask_BT.clone()
    mask_BT[0, 4:] = False  # row 0 is 4 tokens long
    garbage = []
    for fill in (0.0, float("nan"), 1e6):
        probs_BTLE, hidden_BTLH = inputs.probs_BTLE.clone(), inputs.hidden_BTLH.clone()
        probs_BTLE[0, 4:], hidden_BTLH[0, 4:] = fill, fill
        with torch.no_grad():
            garbage.append(model(PredictorInputs(probs_BTLE, hidden_BTLH, mask_BT, inputs.masked_BTL)))
    short = PredictorInputs(
        inputs.probs_BTLE[:1, :4], inputs.hidden_BTLH[:1, :4], mask_BT[:1, :4], inputs.masked_BTL[:1, :4]
    )
    with torch.no_grad():
        unpadded = model(short)
    for out in garbage:
        assert torch.isfinite(out.logits_BTLDE).all() and torch.isfinite(out.confidence_BTLD).all()
        torch.testing.assert_close(out.logits_BTLDE[0, :4], unpadded.logits_BTLDE[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.confidence_BTLD[0, :4], unpadded.confidence_BTLD[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits_BTLDE[1], garbage[0].logits_BTLDE[1])


# --------------------------------------------------------------------------------------------- training signals


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant: str) -> None:
    """Every trainable parameter gets a gradient; the copied routers are frozen and stay in eval mode."""
    model = tiny_model(variant, dropout=0.1).train()
    out = model(random_inputs(masked=True))
    loss = (out.logits_BTLDE * torch.randn_like(out.logits_BTLDE)).sum() + (
        out.confidence_BTLD * torch.randn_like(out.confidence_BTLD)
    ).sum()
    loss.backward()
    for name, param in model.named_parameters():
        if ".routers." in name:
            assert not param.requires_grad and param.grad is None, name
            continue
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert all(not module.training for name, module in model.named_modules() if ".routers" in f".{name}")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gate_prior_alone_is_gate_lookahead(kind: str) -> None:
    """With its heads silenced, a model with the gate prior predicts exactly gate lookahead: the softmax of layer
    l+j+1's router on the hidden state entering l (computed here by hand from the router weights)."""
    model = tiny_model(f"{kind}/prior")
    for name, param in model.named_parameters():
        if name.endswith(("logits.weight", "logits.bias")):
            param.data.zero_()
    inputs = random_inputs()
    with torch.no_grad():
        probs_BTLDE = torch.softmax(model(inputs).logits_BTLDE, -1)
    weights = [layer.weight for layer in model.encoder.gate_lookahead.routers.layers]
    for layer in range(L):
        for j in range(D):
            if layer + j + 1 < L:
                scores_BTE = inputs.hidden_BTLH[:, :, layer] @ weights[layer + j + 1].T
                torch.testing.assert_close(probs_BTLDE[:, :, layer, j], torch.softmax(scores_BTE, -1))
            else:  # past the last layer: no prior, and silenced heads give a flat distribution
                torch.testing.assert_close(probs_BTLDE[:, :, layer, j], torch.full((B, T, E), 1 / E))


@pytest.mark.parametrize("gate", ["input", "prior"])
def test_gate_lookahead_reads_the_routers(gate: str) -> None:
    """Other router weights change the outputs: the gate inputs are used, not merely carried."""
    model, inputs = tiny_model(f"probe/{gate}"), random_inputs()
    with torch.no_grad():
        before = model(inputs).logits_BTLDE
        model.encoder.gate_lookahead.routers.layers[2].weight.mul_(-1)
        after = model(inputs).logits_BTLDE
    assert (after[:, :, 1, 0] - before[:, :, 1, 0]).abs().max() > 1e-4  # layer 2 predicted from layer 1
    torch.testing.assert_close(after[:, :, 2:], before[:, :, 2:])  # no source layer >= 2 predicts layer 2


def test_hierarchical_fusion_weights() -> None:
    model = tiny_model("hierarchical")
    assert isinstance(model, HierarchicalModel)
    out = model(random_inputs())
    fusion_BTLS = out.fusion_weights_BTLS
    assert fusion_BTLS.shape == (B, T, L, 2)
    torch.testing.assert_close(fusion_BTLS.sum(-1), torch.ones(B, T, L))
    assert ((fusion_BTLS > 0) & (fusion_BTLS < 1)).all()
    assert fusion_BTLS[..., 0].flatten().std() > 1e-4  # input-dependent, not a constant mix
    # The logits are a mixture's log-probabilities: already normalised.
    torch.testing.assert_close(out.logits_BTLDE.logsumexp(-1), torch.zeros(B, T, L, D), atol=1e-5, rtol=0)


def test_contextual_learns_next_layer_rule() -> None:
    """Layer l+1's top-1 = (layer l's top-1 + 1) mod E: 100 Adam steps reach > 90% top-1 at d = 1."""

    def task(batch: int, generator: torch.Generator) -> tuple[PredictorInputs, torch.Tensor]:
        first_BT = torch.randint(E, (batch, T), generator=generator)
        top1_BTL = (first_BT[..., None] + torch.arange(L)) % E
        noise_BTLE = torch.randn(batch, T, L, E, generator=generator)
        probs_BTLE = torch.softmax(4 * F.one_hot(top1_BTL, E) + noise_BTLE, dim=-1)
        hidden_BTLH = torch.randn(batch, T, L, H, generator=generator)
        return PredictorInputs(probs_BTLE, hidden_BTLH, torch.ones(batch, T, dtype=torch.bool)), top1_BTL

    generator = torch.Generator().manual_seed(0)
    model = build_model(L, E, H, tiny_config("contextual", d_model=32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        inputs, top1_BTL = task(16, generator)
        logits_BTLE = model(inputs).logits_BTLDE[:, :, : L - 1, 0]  # d = 1 from layers 0..L-2
        loss = F.cross_entropy(logits_BTLE.reshape(-1, E), top1_BTL[:, :, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, top1_BTL = task(64, generator)
    with torch.no_grad():
        predicted_BTL = model.eval()(inputs).logits_BTLDE[:, :, : L - 1, 0].argmax(-1)
    accuracy = (predicted_BTL == top1_BTL[:, :, 1:]).float().mean()
    assert accuracy > 0.9, accuracy


# ------------------------------------------------------------------------------------------------------- errors


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="contextual, transformer, hierarchical, probe"):
        build_model(L, E, H, tiny_config("lstm"))
    with pytest.raises(ValueError, match="gate_lookahead=both needs the traced routers"):
        build_model(L, E, H, tiny_config("probe", gate_lookahead="both"))
    with pytest.raises(ValueError, match=r"routers have \(L, E, H\) = \(4, 5, 8\)"):
        build_model(L, E, H + 1, tiny_config("probe", gate_lookahead="both"), random_bank(L, E, H))
    with pytest.raises(ValueError, match="gate_lookahead='late' is not one of none, input, prior, both"):
        tiny_config("probe", gate_lookahead="late")
    with pytest.raises(ValueError, match="divisible"):
        build_model(L, E, H, tiny_config("contextual", d_model=10, num_heads=4))
    with pytest.raises(ValueError, match="max_lookahead"):
        build_model(L, E, H, tiny_config("transformer", max_lookahead=0))
    with pytest.raises(ValueError, match=r"\(L, E, H\)"):
        build_model(L, E + 1, H, tiny_config("hierarchical"))(random_inputs())
    with pytest.raises(ValueError, match="max_positions"):
        build_model(L, E, H, tiny_config("transformer", max_positions=T - 1))(random_inputs())


def test_build_model_accepts_the_hydra_schema() -> None:
    cfg = PredictorConfig(kind=PredictorKind.transformer, d_model=16, num_heads=2, max_lookahead=D)
    model = build_model(L, E, H, cfg)
    assert isinstance(model, TransformerModel)
    assert model(random_inputs()).logits_BTLDE.shape == (B, T, L, D, E)
