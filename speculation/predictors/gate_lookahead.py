"""Gate lookahead: layer ``l + d``'s router applied to the hidden state entering layer ``l``.

The residual stream changes slowly across layers, so a later router often already "agrees" with the current
hidden state: the speculative expert loading of Eliseev & Mazur 2023 (Mixtral offloading). The
predictor needs only the routers' weights (:class:`~speculation.predictors.routers.RouterBank`, from
``router_weights.safetensors``) and the hidden states the trace saved (``trace.hidden_layers``).

Shape legend (docs/glossary.md): N token rows, H hidden width, E experts, D requested lookaheads, L MoE layers.

Traces collected with ``trace.gate_lookahead=D`` store those scores themselves (``lookahead_logits``, computed at
collect time from the hidden state rounded as the store rounds it), so :class:`StoredGateLookaheadPredictor` needs
neither the hidden states nor the router weights; :func:`gate_lookahead_for` picks what a store supports.

Span routers (``span_length > 1``) make one decision per span from the span's first token; a row does not say
which earlier row leads its span, so the router is applied to every token's own hidden state and ``d = 0``
reproduces the router's choice only at span leaders.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from speculation.errors import UserError
from speculation.predictors.base import Prediction, Predictor
from speculation.predictors.heuristics import max_confidence, target_layers
from speculation.predictors.routers import RouterBank, log_distribution
from speculation.traces.batches import TraceBatch

if TYPE_CHECKING:
    from speculation.traces.reader import TraceStore


STORED_FIX = ", or store the later routers' scores instead: trace.gate_lookahead=3"


class GateLookaheadPredictor(Predictor):
    """``routers.scores(hidden, j)`` is MoE layer ``j``'s router; its distribution is the prediction for layer ``j``.

    Build it with :meth:`from_store` (a collected trace) or from ``RouterBank.from_parts`` (weights in memory).
    """

    name = "gate_lookahead"

    def __init__(self, routers: RouterBank, rows_per_chunk: int = 1 << 16) -> None:
        self.routers = routers
        self.layer_names = routers.layer_names
        self.rows_per_chunk = rows_per_chunk  # bounds the float32 copy of the hidden states
        if routers.span_length > 1:
            warnings.warn(
                f"gate_lookahead applies the span router (span_length={routers.span_length}) to every token's own "
                "hidden state: span sharing needs the span leader's hidden state, which a row does not identify",
                stacklevel=2,
            )

    @classmethod
    def from_store(cls, store: TraceStore) -> GateLookaheadPredictor:
        """The routers of ``router_weights.safetensors`` next to the store's manifest; a UserError for traces whose
        hidden states are projected (the routers read the real ones)."""
        if store.manifest.hidden.projection is not None:
            raise UserError(store.manifest.router_input_problem([], cls.name) + STORED_FIX)
        return cls(RouterBank.from_store(store))

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        targets = target_layers(batch, layer, lookaheads)
        if len(self.routers.layers) != batch.probs_NLE.shape[1]:
            raise ValueError(
                f"gate_lookahead holds {len(self.routers.layers)} routers but the batch has "
                f"{batch.probs_NLE.shape[1]} MoE layers; build it from the same trace store"
            )
        hidden_NH = batch.hidden_at(layer)
        if hidden_NH is None:
            raise UserError(
                f"gate_lookahead needs the hidden state entering MoE layer {layer} ({self.layer_names[layer]}), "
                f"but the trace saved only layers {batch.hidden_layers}; re-collect with trace.save_hidden=true and "
                f"trace.hidden_layers including {layer} (or null for all layers)"
            )
        num_experts = batch.probs_NLE.shape[-1]
        probs_NDE = np.empty((batch.num_rows, len(targets), num_experts), np.float32)
        with torch.inference_mode():
            for start in range(0, batch.num_rows, self.rows_per_chunk):
                chunk = slice(start, start + self.rows_per_chunk)
                hidden = torch.from_numpy(np.ascontiguousarray(hidden_NH[chunk], dtype=np.float32))
                for i, target in enumerate(targets):
                    # The scores as a store keeps them (float16, like the logits the targets come from): this path
                    # and the stored scores' (trace.gate_lookahead) then score identically, bit for bit.
                    scores_NE = self.routers.scores(hidden, target).half().float()
                    probs_NDE[chunk, i] = self.routers.log_distribution(scores_NE).exp().numpy()
        return max_confidence(probs_NDE)


class StoredGateLookaheadPredictor(Predictor):
    """Gate lookahead from the scores the trace stored (``batch.lookahead_NLDE``, ``trace.gate_lookahead=D``).

    The scores are what :class:`GateLookaheadPredictor` computes from a store's hidden states, stored as float16
    (that path rounds them the same way), and they go through the same
    :func:`~speculation.predictors.routers.log_distribution`: the two give identical predictions and metrics
    (tested). It reaches lookaheads 1..D only (``max_lookahead``).
    """

    name = "gate_lookahead"

    def __init__(self, depth: int, score: str) -> None:
        self.max_lookahead = depth
        self.score = score

    @classmethod
    def from_store(cls, store: TraceStore) -> StoredGateLookaheadPredictor:
        if not store.manifest.lookahead_depth:
            raise UserError(f"{store.root} stores no gate-lookahead scores; re-collect with trace.gate_lookahead=3")
        return cls(store.manifest.lookahead_depth, store.manifest.routing.score)

    def reach_fix(self, lookahead: int) -> str:
        return (
            f"re-collect with trace.gate_lookahead={lookahead} (or with every layer's hidden state, unprojected, "
            "from which gate_lookahead reaches any lookahead)"
        )

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        target_layers(batch, layer, lookaheads)
        if batch.lookahead_NLDE is None:
            raise UserError("this batch holds no stored gate-lookahead scores; load it with load_batch(hidden=True)")
        bad = [d for d in lookaheads if not 1 <= d <= self.max_lookahead]
        if bad:
            raise ValueError(
                f"the traces store gate-lookahead scores for d in 1..{self.max_lookahead}, asked for {bad}; "
                f"{self.reach_fix(max(bad))}"
            )
        probs_NDE = np.empty((batch.num_rows, len(lookaheads), batch.probs_NLE.shape[-1]), np.float32)
        with torch.inference_mode():
            for i, d in enumerate(lookaheads):  # one [N, E] block per d, as the hidden-state path computes it
                scores_NE = torch.from_numpy(np.ascontiguousarray(batch.lookahead_NLDE[:, layer, d - 1])).float()
                probs_NDE[:, i] = log_distribution(scores_NE, self.score).exp().numpy()
        return max_confidence(probs_NDE)


def gate_lookahead_for(store: TraceStore) -> tuple[Predictor | None, str | None]:
    """The gate-lookahead baseline ``store`` supports, or None and why: the routers on the hidden states when every
    source layer's unprojected hidden state is there (it reaches any lookahead), else the stored scores."""
    problem = store.manifest.router_input_problem(range(store.num_layers - 1), GateLookaheadPredictor.name)
    if problem is None:
        return GateLookaheadPredictor.from_store(store), None
    if store.manifest.lookahead_depth:
        return StoredGateLookaheadPredictor.from_store(store), None
    return None, problem + STORED_FIX
