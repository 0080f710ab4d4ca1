"""A trained predictor as an inference engine would call it: load a run directory (no trace store), then step
token by token and layer by layer, carrying each model's state, at batch 1.

    predictor = StreamingPredictor.load("workdir/predictors/transformer-seed0")
    predictor.reset()                                  # a new sequence
    for token in decode:
        for layer in range(predictor.num_layers):
            probs_DE, confidence_D = predictor.step(layer, router_probs_E, router_input_H)
            ...                                        # prefetch layer + 1 .. layer + D from probs_DE

``step(layer, ...)`` takes what is known once layer ``layer``'s router has run: its distribution and the hidden
state that entered it. Its outputs equal the batch model's outputs ``[t, layer]`` on the same sequence (tested), so
the numbers of ``spec-evaluate`` are the numbers this API gives.

State per model (``speculation.predictors.learned``): ``probe`` keeps none; ``contextual`` keeps the current
token's routing embeddings (its attention window over layers); ``hierarchical`` its layer LSTM's state and the
running sum of the previous tokens' summaries; ``transformer`` its layer LSTM's state and the previous tokens' slot
embeddings, over which its causal context encoder runs once per token (at layer 0) — ``nn.TransformerEncoder`` has
no key/value cache, so that one call grows with the position, up to ``predictor.max_positions``.

A model with gate lookahead (``predictor.gate_lookahead``) applies its own frozen copies of the routers of layers
``layer + 1 .. layer + D`` to ``hidden_H`` in the step: an engine that already runs those routers early could hand
their scores in instead, at no extra cost.

Shape legend (docs/glossary.md): L MoE layers, E experts, H hidden width, D lookaheads, M predictor width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from speculation.errors import UserError
from speculation.predictors.learned import (
    ContextualModel,
    HierarchicalModel,
    PredictorInputs,
    ProbeModel,
    TransformerModel,
)
from speculation.predictors.trained import load_model


class StreamingPredictor:
    """Batch-1, step-by-step inference of one trained model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, name: str = "") -> None:
        self.model = model.eval().requires_grad_(False)  # inference only: no autograd state on any output
        self.name = name
        self.num_layers, self.num_experts, self.hidden_size = model.encoder.shape_LEH
        self.reset()

    @classmethod
    def load(cls, run_dir: Path | str) -> StreamingPredictor:
        """A finished run of ``spec-train`` (its files checked as ``spec-evaluate`` checks them)."""
        model, meta = load_model(Path(run_dir))
        return cls(model, meta["name"])

    def reset(self) -> None:
        """Start a new sequence."""
        self.position = 0  # the current token's index in its sequence
        self.next_layer = 0
        self._routing_LM: list[torch.Tensor] = []  # the current token's routing embeddings, layers so far
        self._lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._context_M: torch.Tensor | None = None  # transformer: this token's context vector
        self._slots_TM: list[torch.Tensor] = []  # transformer: previous tokens' slot embeddings (no position)
        self._summary_sum_M: torch.Tensor | None = None  # hierarchical: sum of previous tokens' summaries

    @torch.no_grad()
    def step(self, layer: int, probs_E: torch.Tensor, hidden_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted distributions [D, E] over layers ``layer + 1 .. layer + D`` and confidences [D]."""
        if layer != self.next_layer:
            raise UserError(
                f"step(layer={layer}) out of order: the current token's next layer is {self.next_layer} (call the "
                f"layers 0..{self.num_layers - 1} of each token in order; reset() starts a new sequence)."
            )
        model = self.model
        encoder = model.encoder
        hidden_H = hidden_H.float()
        gate_DE = None if encoder.gate_lookahead is None else encoder.gate_lookahead.step_log_probs(hidden_H, layer)
        routing_M = encoder.routing_proj(probs_E.float()) + encoder.layer_embedding.weight[layer]
        hidden_M = encoder.embed_hidden(hidden_H, gate_DE)
        self._routing_LM.append(routing_M)
        if isinstance(model, ContextualModel):
            logits_DE, confidence_D = self._contextual(layer, routing_M, hidden_M)
        elif isinstance(model, TransformerModel):
            logits_DE, confidence_D = self._transformer(layer, routing_M, hidden_M)
        elif isinstance(model, HierarchicalModel):
            logits_DE, confidence_D = self._hierarchical(layer, routing_M, hidden_M)
        elif isinstance(model, ProbeModel):
            logits_DE, confidence_D = model.head_outputs(routing_M, hidden_M)
        else:
            raise UserError(f"no streaming step for {type(model).__name__}")
        self.next_layer += 1
        if self.next_layer == self.num_layers:
            self._end_token(hidden_M)
        return torch.softmax(encoder.add_prior(logits_DE, gate_DE), -1), confidence_D

    def _lstm(self, lstm: torch.nn.LSTM, input_M: torch.Tensor) -> torch.Tensor:
        output, self._lstm_state = lstm(input_M[None, None], self._lstm_state)
        return output[0, 0]

    def _position_M(self) -> torch.Tensor:
        return self.model.positions(self.position + 1)[self.position]

    def _contextual(self, layer: int, routing_M: torch.Tensor, hidden_M: torch.Tensor) -> tuple:
        model = self.model
        query_M = model.query_norm(hidden_M + model.encoder.layer_embedding.weight[layer] + self._position_M())
        window = int((~model.blocked_LL[layer]).sum())  # layers layer - window + 1 .. layer
        keys_NM = torch.stack(self._routing_LM[-window:])
        attended, _ = model.attention(query_M[None, None], keys_NM[None], keys_NM[None], need_weights=False)
        return model.heads(model.fuse(torch.cat([attended[0, 0], query_M])))

    def _transformer(self, layer: int, routing_M: torch.Tensor, hidden_M: torch.Tensor) -> tuple:
        model = self.model
        if layer == 0:
            slots_TM = torch.stack([model.no_context, *self._slots_TM]) + model.positions(self.position + 1)
            causal_TT = torch.ones(len(slots_TM), len(slots_TM), dtype=torch.bool).triu(1)
            self._context_M = model.context(slots_TM[None], mask=causal_TT, is_causal=True)[0, -1]
        current_M = self._lstm(model.history.lstm, routing_M + hidden_M) + model.encoder.layer_embedding.weight[layer]
        return model.heads(model.fuse(torch.cat([self._context_M, current_M])))

    def _hierarchical(self, layer: int, routing_M: torch.Tensor, hidden_M: torch.Tensor) -> tuple:
        model = self.model
        layer_M = model.encoder.layer_embedding.weight[layer]
        token_M = model.token_mlp(self._lstm(model.history.lstm, routing_M + hidden_M) + layer_M)
        seen = self._summary_sum_M
        context_M = model.no_context if seen is None else seen / self.position  # the mean over previous tokens
        sequence_M = model.sequence_mlp(context_M + layer_M)
        log_fusion_S = F.log_softmax(model.gate(torch.cat([token_M, sequence_M])), dim=-1)
        token_logits_DE, token_confidence_D = model.token_heads(token_M)
        sequence_logits_DE, sequence_confidence_D = model.sequence_heads(sequence_M)
        log_probs_DSE = torch.stack([F.log_softmax(token_logits_DE, -1), F.log_softmax(sequence_logits_DE, -1)], -2)
        logits_DE = torch.logsumexp(log_probs_DSE + log_fusion_S[None, :, None], dim=-2)
        confidence_D = (torch.stack([token_confidence_D, sequence_confidence_D], -1) * log_fusion_S.exp()).sum(-1)
        return logits_DE, confidence_D

    def _end_token(self, hidden_last_M: torch.Tensor) -> None:
        """The token's last layer ran: fold it into the sequence state and move to the next token."""
        model = self.model
        routing_LM = torch.stack(self._routing_LM)
        if isinstance(model, TransformerModel):
            self._slots_TM.append(model.summary.proj(routing_LM.flatten()) + hidden_last_M)
        elif isinstance(model, HierarchicalModel):
            summary_M = model.summary.proj(routing_LM.flatten())
            self._summary_sum_M = summary_M if self._summary_sum_M is None else self._summary_sum_M + summary_M
        self._routing_LM = []
        self._lstm_state = None
        self.next_layer = 0
        self.position += 1


def batch_outputs(model: torch.nn.Module, probs_TLE: torch.Tensor, hidden_TLH: torch.Tensor) -> tuple:
    """The batch model's distributions [T, L, D, E] and confidences [T, L, D] on one sequence: the reference the
    streaming steps must reproduce."""
    inputs = PredictorInputs(probs_TLE[None], hidden_TLH[None], torch.ones(1, len(probs_TLE), dtype=torch.bool))
    with torch.no_grad():
        out = model.eval()(inputs)
    return torch.softmax(out.logits_BTLDE[0], -1), out.confidence_BTLD[0]
