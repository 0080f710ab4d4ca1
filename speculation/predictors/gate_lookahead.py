"""Gate lookahead: layer ``l + d``'s router applied to the hidden state entering layer ``l``.

The residual stream changes slowly across layers, so a later router often already "agrees" with the current
hidden state: the speculative expert loading of Eliseev & Mazur 2023 (Mixtral offloading). The
predictor needs only the routers' weights (``router_weights.safetensors``, keys ``<layer label>.<param>``,
metadata ``format`` = adapter family) and the hidden states the trace saved (``trace.hidden_layers``).

Shape legend (docs/glossary.md): N token rows, H hidden width, E experts, D requested lookaheads, L MoE layers.

What is reproduced is the router's *distribution* (softmax, or DeepSeek-V3's normalised sigmoid); selection
details that depend on other tokens or on state (capacity dropping, correction biases, group limits) are the
simulator's business, not part of a distribution. Span routers (``span_length > 1``) make one decision per span
from the span's first token; a row does not say which earlier row leads its span, so the router is applied to
every token's own hidden state and ``d = 0`` reproduces the router's choice only at span leaders.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from speculation.config.model import Gate, RouterConfig, Selection
from speculation.errors import MissingInputError, UserError
from speculation.models.router import Router
from speculation.predictors.base import Prediction, Predictor
from speculation.predictors.heuristics import max_confidence, target_layers
from speculation.traces.batches import TraceBatch
from speculation.traces.manifest import SCORES
from speculation.tracing.registry import ADAPTERS

if TYPE_CHECKING:
    from speculation.traces.reader import TraceStore

Scorer = Callable[[torch.Tensor], torch.Tensor]  # hidden [N, H] float32 -> router scores [N, E] float32
FAMILIES = tuple(ADAPTERS)  # every traced family: embedded, Switch (classifier.weight), top-k routers (weight)


def _router_config(raw: Mapping[str, Any]) -> RouterConfig:
    """The RouterConfig a manifest stored: JSON turned the enums into their values, so turn them back."""
    known = {f.name for f in fields(RouterConfig)}
    values = {"gate": Gate.linear, "selection": Selection.topk} | {k: v for k, v in raw.items() if k in known}
    return RouterConfig.from_json(values)


def _embedded_scorer(
    state: Mapping[str, torch.Tensor], num_experts: int, router_config: Mapping[str, Any] | None
) -> Scorer:
    if router_config is None:
        raise UserError(
            "manifest['routing'] has no 'router_config', which gate_lookahead needs to rebuild the embedded router; "
            "re-collect the traces with this version of spec-collect"
        )
    cfg = _router_config(router_config)
    # Both gates' first matrix reads the hidden state: linear [E, H], cosine projection [cosine_dim, H].
    first = state.get("weight.weight", state.get("proj.weight"))
    if first is None:
        raise UserError(f"embedded router weights have no 'weight.weight' or 'proj.weight'; found {sorted(state)}")
    router = Router(int(first.shape[1]), num_experts, cfg)
    router.load_state_dict(dict(state))  # strict: a missing or extra tensor means another router variant
    router.eval()  # noisy gating adds its noise only in training
    return router.scores  # float32 logits after temperature, before span sharing


def _linear_scorer(weight: torch.Tensor, bias: torch.Tensor | None) -> Scorer:
    weight = weight.float()
    bias = None if bias is None else bias.float()
    return lambda hidden_NH: F.linear(hidden_NH, weight, bias)


class GateLookaheadPredictor(Predictor):
    """``scorers[j]`` maps the hidden state to MoE layer ``j``'s router scores; ``score`` turns scores into a
    distribution ("softmax", or "sigmoid" = sigmoid scores normalised to sum to 1).

    Build it with :meth:`from_store` (a collected trace) or :meth:`from_parts` (weights already in memory).
    """

    name = "gate_lookahead"

    def __init__(
        self,
        scorers: Sequence[Scorer],
        score: str = "softmax",
        layer_names: Sequence[str] | None = None,
        rows_per_chunk: int = 1 << 16,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not one of {SCORES}")
        self.scorers = list(scorers)
        self.score = score
        self.layer_names = list(layer_names) if layer_names is not None else [str(j) for j in range(len(scorers))]
        self.rows_per_chunk = rows_per_chunk  # bounds the float32 copy of the hidden states

    @classmethod
    def from_store(cls, store: TraceStore) -> GateLookaheadPredictor:
        """Load ``router_weights.safetensors`` next to the store's manifest, as its routing section describes."""
        manifest = store.manifest
        path = Path(store.root) / manifest.router_weights_file
        if not path.is_file():
            raise MissingInputError(
                f"{path} is missing: gate_lookahead needs the routers' weights, which spec-collect writes when a "
                "collection finishes; re-run spec-collect for this workdir"
            )
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        routing = manifest.routing
        return cls.from_parts(
            metadata.get("format") or manifest.router_family,
            store.layer_names,
            tensors,
            routing.num_experts,
            routing.score,
            routing.router_config,
        )

    @classmethod
    def from_parts(
        cls,
        family: str | None,
        layer_names: Sequence[str],
        tensors: Mapping[str, torch.Tensor],
        num_experts: int,
        score: str = "softmax",
        router_config: Mapping[str, Any] | None = None,
    ) -> GateLookaheadPredictor:
        """``tensors`` keyed ``<layer label>.<param>`` (as ``save_router_weights`` writes them); ``score`` and
        ``router_config`` (the embedded model's, needed to rebuild it) as the manifest's routing section has them."""
        if family not in FAMILIES:
            raise UserError(f"gate_lookahead cannot rebuild routers of family {family!r}; supported: {FAMILIES}")
        scorers = []
        for label in layer_names:
            prefix = f"{label}."  # the dot keeps "decoder.1" from claiming "decoder.11.*"
            state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            if not state:
                raise UserError(f"router weights have no tensors for layer {label!r}; re-run spec-collect")
            if family == "embedded_switch":
                scorers.append(_embedded_scorer(state, num_experts, router_config))
                continue
            weight_key = "classifier.weight" if family == "switch_transformers" else "weight"
            if weight_key not in state:
                raise UserError(f"router weights of layer {label!r} have no {weight_key!r}; found {sorted(state)}")
            # DeepSeek-V3's e_score_correction_bias only steers selection; the distribution is the unbiased one.
            bias = state.get("classifier.bias" if family == "switch_transformers" else "bias")
            scorers.append(_linear_scorer(state[weight_key], bias))
        span_length = (router_config or {}).get("span_length", 1)
        if span_length > 1:
            warnings.warn(
                f"gate_lookahead applies the span router (span_length={span_length}) to every token's own hidden "
                "state: span sharing needs the span leader's hidden state, which a row does not identify",
                stacklevel=2,
            )
        return cls(scorers, score=score, layer_names=layer_names)

    def distribution(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Router scores -> the routing distribution [N, E] in float32."""
        scores_NE = scores_NE.float()
        if self.score == "sigmoid":
            sigmoid_NE = torch.sigmoid(scores_NE)
            return sigmoid_NE / sigmoid_NE.sum(-1, keepdim=True)
        return torch.softmax(scores_NE, dim=-1)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        targets = target_layers(batch, layer, lookaheads)
        if len(self.scorers) != batch.probs_NLE.shape[1]:
            raise ValueError(
                f"gate_lookahead holds {len(self.scorers)} routers but the batch has {batch.probs_NLE.shape[1]} "
                "MoE layers; build it from the same trace store"
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
                    probs_NDE[chunk, i] = self.distribution(self.scorers[target](hidden)).numpy()
        return max_confidence(probs_NDE)
