"""Learned routing predictors: ``contextual``, ``transformer`` and ``hierarchical`` models.

Shape legend (docs/glossary.md): B batch rows (windows of one traced sequence each), T tokens per window, L MoE
layers, E experts, H hidden width, D lookaheads (``max_lookahead``; entry ``j`` predicts layer ``l + j + 1``),
M predictor width (``d_model``), S fusion sources of the hierarchical model (0 = token-level, 1 = sequence-level).

**Causality** (the contract of :mod:`speculation.predictors.base`): output ``[b, t, l]`` reads token ``t`` only at
layers ``<= l`` and tokens ``t' < t`` of row ``b`` at any layer. Every model holds it by construction: across layers
through a banded attention mask or an LSTM run from layer 0 upwards; across tokens through a one-token shift (slot
``t`` holds the features of token ``t - 1``) followed by causal attention or a running sum. No op mixes batch rows
(LayerNorm only, never BatchNorm).

**Gate lookahead** (``predictor.gate_lookahead``): the routers of layers ``l + 1 .. l + D`` applied to the hidden
state entering layer ``l`` (:class:`GateInputs`, frozen copies of the traced routers) read token ``t`` at layer
``l`` only, so they keep the contract; as inputs they are embedded into the hidden-state features, as a prior their
log-probabilities are added to the predicted logits with a learned scale per lookahead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speculation.config.predictor import PredictorConfig, PredictorKind
from speculation.errors import UserError
from speculation.predictors.routers import RouterBank


@dataclass
class PredictorInputs:
    """A batch of right-padded windows of traced sequences."""

    probs_BTLE: torch.Tensor  # float32 router distributions
    hidden_BTLH: torch.Tensor  # float32 hidden state entering each layer's router
    mask_BT: torch.Tensor  # bool, True = real token
    masked_BTL: torch.Tensor | None = None  # bool, True = routing entry replaced by the mask embedding (training)


@dataclass
class PredictorOutputs:
    """Predictions for every (token, layer, lookahead); entries with ``l + d >= L`` exist but mean nothing."""

    logits_BTLDE: torch.Tensor  # float32; softmax gives the predicted distribution over layer l+j+1's experts
    confidence_BTLD: torch.Tensor  # float32 in (0, 1): belief that the top-1 is right
    fusion_weights_BTLS: torch.Tensor | None = None  # hierarchical only: softmax weights of the two sources


# ------------------------------------------------------------------------------------------------ building blocks


def mlp(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Two-layer perceptron, applied independently to every (token, layer) entry."""
    return nn.Sequential(
        nn.Linear(in_features, out_features), nn.GELU(), nn.Dropout(dropout), nn.Linear(out_features, out_features)
    )


def shift_tokens(x_BT: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Move every token's features one slot later ([B, T, ...] -> [B, T, ...]); slot 0 gets ``first``.

    Slot ``t`` then holds token ``t - 1``, so any causal op over slots (``<= t``) only sees tokens ``< t``.
    """
    first_B1 = first.expand(x_BT.shape[0], 1, *x_BT.shape[2:]).to(x_BT.dtype)
    return torch.cat([first_B1, x_BT[:, :-1]], dim=1)


class GateInputs(nn.Module):
    """Gate lookahead inside a learned model: frozen routers, an embedding of their predictions and/or a prior.

    ``input``: the D x E log-probabilities of layers l+1..l+D's routers on the hidden state entering l are embedded
    into that (token, layer)'s hidden features. ``prior``: they are added to the predicted logits, scaled by a
    learned weight per lookahead (1 at the start, so an untrained model already predicts what gate lookahead does).
    """

    def __init__(self, routers: RouterBank, mode: str, max_lookahead: int, d_model: int):
        super().__init__()
        self.routers = routers
        self.max_lookahead = max_lookahead
        self.embed = nn.Linear(max_lookahead * routers.num_experts, d_model) if mode in ("input", "both") else None
        self.prior_scale_D = nn.Parameter(torch.ones(max_lookahead)) if mode in ("prior", "both") else None

    def log_probs(self, hidden_BTLH: torch.Tensor) -> torch.Tensor:
        """[B, T, L, D, E] gate-lookahead log-probabilities (0 past the last layer)."""
        return self.routers.lookahead_log_probs(hidden_BTLH, self.max_lookahead)

    def step_log_probs(self, hidden_H: torch.Tensor, layer: int) -> torch.Tensor:
        """[D, E]: :meth:`log_probs` of one token at one layer."""
        return self.routers.step_log_probs(hidden_H, layer, self.max_lookahead)

    def features(self, log_probs_DE: torch.Tensor) -> torch.Tensor | float:
        """[..., M] input features (0 when the mode uses none)."""
        return 0.0 if self.embed is None else self.embed(log_probs_DE.flatten(-2))

    def add_prior(self, logits_DE: torch.Tensor, log_probs_DE: torch.Tensor) -> torch.Tensor:
        """``logits + scale_d * log p_gate`` (the logits unchanged when the mode has no prior)."""
        return logits_DE if self.prior_scale_D is None else logits_DE + self.prior_scale_D[:, None] * log_probs_DE


class InputEncoder(nn.Module):
    """Per-(token, layer) embeddings of routing (plus a layer embedding) and of the hidden state (plus its gate
    lookahead features when the model has :class:`GateInputs`)."""

    def __init__(
        self, num_layers: int, num_experts: int, hidden_size: int, d_model: int, gate: GateInputs | None = None
    ):
        super().__init__()
        self.shape_LEH = (num_layers, num_experts, hidden_size)
        self.routing_proj = nn.Linear(num_experts, d_model)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(d_model))
        self.layer_embedding = nn.Embedding(num_layers, d_model)
        # Router inputs of real models have large, layer-dependent norms; LayerNorm over H alone keeps causality.
        # No affine part: the projection after it already scales and shifts.
        self.hidden_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.hidden_proj = nn.Linear(hidden_size, d_model)
        self.gate_lookahead = gate

    def embed_hidden(self, hidden_H: torch.Tensor, gate_DE: torch.Tensor | None) -> torch.Tensor:
        """[..., H] hidden states (and their [..., D, E] gate lookahead) -> [..., M] features."""
        hidden_M = self.hidden_proj(self.hidden_norm(hidden_H))
        return hidden_M if gate_DE is None else hidden_M + self.gate_lookahead.features(gate_DE)

    def forward(self, inputs: PredictorInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """routing_BTLM (masked entries -> mask embedding, layer embedding added), hidden_BTLM and the gate
        lookahead log-probabilities gate_BTLDE (None without :class:`GateInputs`)."""
        probs_BTLE, hidden_BTLH, mask_BT = inputs.probs_BTLE, inputs.hidden_BTLH, inputs.mask_BT
        got = (probs_BTLE.shape[2], probs_BTLE.shape[3], hidden_BTLH.shape[3])
        if got != self.shape_LEH or hidden_BTLH.shape[:3] != probs_BTLE.shape[:3]:
            raise ValueError(
                f"inputs have probs {tuple(probs_BTLE.shape)} and hidden {tuple(hidden_BTLH.shape)}, but this model "
                f"was built for (L, E, H) = {self.shape_LEH}; rebuild it for these traces"
            )
        # Padding may hold anything (even NaN, and NaN * 0 weight = NaN inside attention): zero it at the source.
        real_BT11 = mask_BT[:, :, None, None]
        probs_BTLE = torch.where(real_BT11, probs_BTLE, 0.0)
        hidden_BTLH = torch.where(real_BT11, hidden_BTLH, 0.0)
        routing_BTLM = self.routing_proj(probs_BTLE)
        if inputs.masked_BTL is not None:
            routing_BTLM = torch.where(inputs.masked_BTL[..., None], self.mask_embedding, routing_BTLM)
        routing_BTLM = routing_BTLM + self.layer_embedding.weight  # the layer stays known even where masked
        gate_BTLDE = None if self.gate_lookahead is None else self.gate_lookahead.log_probs(hidden_BTLH)
        return routing_BTLM, self.embed_hidden(hidden_BTLH, gate_BTLDE), gate_BTLDE

    def add_prior(self, logits_DE: torch.Tensor, gate_DE: torch.Tensor | None) -> torch.Tensor:
        return logits_DE if gate_DE is None else self.gate_lookahead.add_prior(logits_DE, gate_DE)


class PositionEmbedding(nn.Module):
    """Learned embedding of a token's position in its window: [T, M]."""

    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        self.table = nn.Embedding(max_positions, d_model)

    def forward(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.table.num_embeddings:
            raise UserError(
                f"window of {num_tokens} tokens exceeds predictor.max_positions={self.table.num_embeddings}; "
                "raise max_positions or use shorter windows"
            )
        return self.table.weight[:num_tokens]


class LayerHistory(nn.Module):
    """LSTM up each token's layers: output [t, l] is the state after step l, so it has seen layers 0..l only."""

    def __init__(self, d_model: int):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, batch_first=True)

    def forward(self, steps_BTLM: torch.Tensor) -> torch.Tensor:
        B, T, L, M = steps_BTLM.shape
        states_NLM, _ = self.lstm(steps_BTLM.reshape(B * T, L, M))
        return states_NLM.reshape(B, T, L, M)


class TokenSummary(nn.Module):
    """One vector per token from its routing at all L layers (flattened, so each layer keeps its own weights)."""

    def __init__(self, num_layers: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(num_layers * d_model, d_model)

    def forward(self, routing_BTLM: torch.Tensor) -> torch.Tensor:
        return self.proj(routing_BTLM.flatten(2))


class PredictionHeads(nn.Module):
    """D x E logits and D confidences per (token, layer) feature vector."""

    def __init__(self, d_model: int, max_lookahead: int, num_experts: int):
        super().__init__()
        self.shape_DE = (max_lookahead, num_experts)
        self.norm = nn.LayerNorm(d_model)
        self.logits = nn.Linear(d_model, max_lookahead * num_experts)
        self.confidence = nn.Linear(d_model, max_lookahead)

    def forward(self, features_BTLM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features_BTLM = self.norm(features_BTLM)
        logits_BTLDE = self.logits(features_BTLM).unflatten(-1, self.shape_DE)
        return logits_BTLDE, torch.sigmoid(self.confidence(features_BTLM))


# ---------------------------------------------------------------------------------------------------- the models


class ContextualModel(nn.Module):
    """Attention over the current token's last ``context_layers`` layers of routing; uses no other token.

    Query at (t, l): hidden state entering layer l + layer embedding + position of t. Keys/values: routing
    embeddings of layers max(0, l - context_layers + 1) .. l. The attended vector and the query are fused by an MLP.
    """

    def __init__(
        self, num_layers: int, num_experts: int, hidden_size: int, cfg: PredictorConfig, gate: GateInputs | None
    ):
        super().__init__()
        M = cfg.d_model
        self.encoder = InputEncoder(num_layers, num_experts, hidden_size, M, gate)
        self.positions = PositionEmbedding(cfg.max_positions, M)
        self.query_norm = nn.LayerNorm(M)
        self.attention = nn.MultiheadAttention(M, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        layer_L = torch.arange(num_layers)
        offset_LL = layer_L[:, None] - layer_L[None, :]  # query layer l minus key layer j
        # True = blocked: later layers (the future of this token) and layers older than the context window.
        self.register_buffer("blocked_LL", (offset_LL < 0) | (offset_LL >= cfg.context_layers), persistent=False)
        self.fuse = mlp(2 * M, M, cfg.dropout)
        self.heads = PredictionHeads(M, cfg.max_lookahead, num_experts)

    def forward(self, inputs: PredictorInputs) -> PredictorOutputs:
        routing_BTLM, hidden_BTLM, gate_BTLDE = self.encoder(inputs)
        B, T, L, M = routing_BTLM.shape
        query_BTLM = hidden_BTLM + self.encoder.layer_embedding.weight + self.positions(T)[:, None]
        query_BTLM = self.query_norm(query_BTLM)
        attended_NLM, _ = self.attention(
            query_BTLM.reshape(B * T, L, M),
            routing_BTLM.reshape(B * T, L, M),
            routing_BTLM.reshape(B * T, L, M),
            attn_mask=self.blocked_LL,
            need_weights=False,
        )
        features_BTLM = self.fuse(torch.cat([attended_NLM.reshape(B, T, L, M), query_BTLM], dim=-1))
        logits_BTLDE, confidence_BTLD = self.heads(features_BTLM)
        return PredictorOutputs(self.encoder.add_prior(logits_BTLDE, gate_BTLDE), confidence_BTLD)


class TransformerModel(nn.Module):
    """Causal transformer over the preceding tokens + LSTM over the current token's layers, fused by an MLP.

    Token t' is summarised by its routing at all layers and its last layer's hidden state; slot t of the transformer
    holds token t - 1 (slot 0 a learned "no context" vector), so with a causal mask slot t sees tokens < t only.
    """

    def __init__(
        self, num_layers: int, num_experts: int, hidden_size: int, cfg: PredictorConfig, gate: GateInputs | None
    ):
        super().__init__()
        M = cfg.d_model
        self.encoder = InputEncoder(num_layers, num_experts, hidden_size, M, gate)
        self.positions = PositionEmbedding(cfg.max_positions, M)
        self.summary = TokenSummary(num_layers, M)
        self.no_context = nn.Parameter(0.02 * torch.randn(M))
        block = nn.TransformerEncoderLayer(
            M, cfg.num_heads, 2 * M, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.context = nn.TransformerEncoder(block, cfg.num_blocks, norm=nn.LayerNorm(M), enable_nested_tensor=False)
        self.history = LayerHistory(M)
        self.fuse = mlp(2 * M, M, cfg.dropout)
        self.heads = PredictionHeads(M, cfg.max_lookahead, num_experts)

    def forward(self, inputs: PredictorInputs) -> PredictorOutputs:
        routing_BTLM, hidden_BTLM, gate_BTLDE = self.encoder(inputs)
        T, L = routing_BTLM.shape[1:3]
        token_BTM = self.summary(routing_BTLM) + hidden_BTLM[:, :, -1]
        slots_BTM = shift_tokens(token_BTM, self.no_context) + self.positions(T)
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=slots_BTM.device).triu(1)  # True = blocked
        context_BTM = self.context(slots_BTM, mask=causal_TT, is_causal=True)
        history_BTLM = self.history(routing_BTLM + hidden_BTLM)
        current_BTLM = history_BTLM + self.encoder.layer_embedding.weight
        features_BTLM = self.fuse(torch.cat([context_BTM[:, :, None].expand(-1, -1, L, -1), current_BTLM], dim=-1))
        logits_BTLDE, confidence_BTLD = self.heads(features_BTLM)
        return PredictorOutputs(self.encoder.add_prior(logits_BTLDE, gate_BTLDE), confidence_BTLD)


class HierarchicalModel(nn.Module):
    """A token-level and a sequence-level predictor, mixed per (token, layer) by learned fusion weights.

    Token level: LSTM over the current token's layers 0..l (routing + hidden state). Sequence level: running mean of
    the preceding real tokens' routing summaries (token t excluded). A gate on both feature vectors gives softmax
    weights ``fusion_weights_BTLS`` (returned in the outputs); the prediction is the mixture of the two
    distributions, returned as its log-probabilities.
    """

    def __init__(
        self, num_layers: int, num_experts: int, hidden_size: int, cfg: PredictorConfig, gate: GateInputs | None
    ):
        super().__init__()
        M = cfg.d_model
        self.encoder = InputEncoder(num_layers, num_experts, hidden_size, M, gate)
        self.history = LayerHistory(M)
        self.token_mlp = mlp(M, M, cfg.dropout)
        self.summary = TokenSummary(num_layers, M)
        self.no_context = nn.Parameter(0.02 * torch.randn(M))
        self.sequence_mlp = mlp(M, M, cfg.dropout)
        self.token_heads = PredictionHeads(M, cfg.max_lookahead, num_experts)
        self.sequence_heads = PredictionHeads(M, cfg.max_lookahead, num_experts)
        self.gate = nn.Sequential(nn.Linear(2 * M, M), nn.GELU(), nn.Linear(M, 2))

    def forward(self, inputs: PredictorInputs) -> PredictorOutputs:
        routing_BTLM, hidden_BTLM, gate_BTLDE = self.encoder(inputs)
        layer_LM = self.encoder.layer_embedding.weight
        token_BTLM = self.token_mlp(self.history(routing_BTLM + hidden_BTLM) + layer_LM)

        real_BT1 = inputs.mask_BT[..., None].to(routing_BTLM.dtype)
        summary_BTM = self.summary(routing_BTLM) * real_BT1
        # Sums over tokens <= t, shifted one slot: slot t holds the sum over real tokens < t.
        total_BTM = shift_tokens(summary_BTM.cumsum(1), torch.zeros_like(self.no_context))
        count_BT1 = shift_tokens(real_BT1.cumsum(1), torch.zeros(1, device=real_BT1.device))
        context_BTM = torch.where(count_BT1 > 0, total_BTM / count_BT1.clamp(min=1), self.no_context)
        sequence_BTLM = self.sequence_mlp(context_BTM[:, :, None] + layer_LM)

        log_fusion_BTLS = F.log_softmax(self.gate(torch.cat([token_BTLM, sequence_BTLM], dim=-1)), dim=-1)
        token_logits_BTLDE, token_confidence_BTLD = self.token_heads(token_BTLM)
        sequence_logits_BTLDE, sequence_confidence_BTLD = self.sequence_heads(sequence_BTLM)
        # Mix distributions, not logits: p = w_tok p_tok + w_seq p_seq is a proper mixture; log p are valid logits.
        log_probs_BTLDSE = torch.stack(
            [F.log_softmax(token_logits_BTLDE, -1), F.log_softmax(sequence_logits_BTLDE, -1)], dim=-2
        )
        logits_BTLDE = torch.logsumexp(log_probs_BTLDSE + log_fusion_BTLS[:, :, :, None, :, None], dim=-2)
        logits_BTLDE = self.encoder.add_prior(logits_BTLDE, gate_BTLDE)  # a product with the gate prior
        fusion_BTLS = log_fusion_BTLS.exp()
        confidence_BTLDS = torch.stack([token_confidence_BTLD, sequence_confidence_BTLD], dim=-1)
        confidence_BTLD = (confidence_BTLDS * fusion_BTLS[:, :, :, None]).sum(-1)
        return PredictorOutputs(logits_BTLDE, confidence_BTLD, fusion_weights_BTLS=fusion_BTLS)


class ProbeModel(nn.Module):
    """The cheapest learned predictor, the cost baseline: two linear layers per (token, layer).

    Features: the hidden state entering layer l (with its gate lookahead embedded, when configured) plus that
    layer's routing and the layer embedding, through a GELU into the heads; in the spirit of the pre-attention
    predictors of the literature. It reads no other layer and no other token.
    """

    def __init__(
        self, num_layers: int, num_experts: int, hidden_size: int, cfg: PredictorConfig, gate: GateInputs | None
    ):
        super().__init__()
        self.encoder = InputEncoder(num_layers, num_experts, hidden_size, cfg.d_model, gate)
        self.heads = PredictionHeads(cfg.d_model, cfg.max_lookahead, num_experts)

    def head_outputs(self, routing_M: torch.Tensor, hidden_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., M] encoder features -> logits [..., D, E] and confidences [..., D], before the gate prior; the
        batch forward and the streaming step both call it."""
        return self.heads(F.gelu(routing_M + hidden_M))

    def forward(self, inputs: PredictorInputs) -> PredictorOutputs:
        routing_BTLM, hidden_BTLM, gate_BTLDE = self.encoder(inputs)
        logits_BTLDE, confidence_BTLD = self.head_outputs(routing_BTLM, hidden_BTLM)
        return PredictorOutputs(self.encoder.add_prior(logits_BTLDE, gate_BTLDE), confidence_BTLD)


def learned_parameters(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """How many values a model learns, from its ``named_parameters()`` or state dict: every tensor but the frozen
    router copies its :class:`GateInputs` holds (under ``...routers.``)."""
    return sum(tensor.numel() for name, tensor in named_tensors if ".routers." not in name)


MODELS: dict[PredictorKind, type[nn.Module]] = {
    PredictorKind.contextual: ContextualModel,
    PredictorKind.transformer: TransformerModel,
    PredictorKind.hierarchical: HierarchicalModel,
    PredictorKind.probe: ProbeModel,
}


def build_model(
    num_layers: int, num_experts: int, hidden_size: int, cfg: PredictorConfig, routers: RouterBank | None = None
) -> nn.Module:
    """The learned predictor ``cfg.kind`` for traces with L MoE layers, E experts and hidden width H; ``routers``:
    the traced routers, which ``cfg.gate_lookahead`` other than none needs (their geometry must match).

    ``cfg`` was validated when it was built (``PredictorConfig.__post_init__``); the traces must have a layer.
    """
    if str(cfg.kind) not in MODELS:
        raise ValueError(f"unknown predictor kind {cfg.kind!r}; choose one of {', '.join(MODELS)}")
    if num_layers < 1:
        raise ValueError(f"the traces have {num_layers} MoE layers; a predictor needs at least one")
    gate = None
    if cfg.uses_routers:
        if routers is None:
            raise ValueError(f"predictor.gate_lookahead={cfg.gate_lookahead} needs the traced routers; pass routers")
        got = (len(routers.layers), routers.num_experts, routers.hidden_size)
        if got != (num_layers, num_experts, hidden_size):
            raise ValueError(f"routers have (L, E, H) = {got}; the traces {(num_layers, num_experts, hidden_size)}")
        gate = GateInputs(routers, cfg.gate_lookahead, cfg.max_lookahead, cfg.d_model)
    return MODELS[PredictorKind(cfg.kind)](num_layers, num_experts, hidden_size, cfg, gate)
