"""Frozen copies of a traced model's routers: what gate lookahead and the learned models' gate inputs apply.

The routers' weights come from ``router_weights.safetensors`` (keys ``<layer label>.<param>``, metadata
``format`` = adapter family), which ``spec-collect`` writes next to the traces. A :class:`RouterBank` is an
``nn.Module``, so a learned predictor that holds one saves it in its own ``model.safetensors`` and its run directory
needs no trace store; :attr:`RouterBank.spec` (in ``predictor.json``) rebuilds the empty modules it loads into.

Shape legend (docs/glossary.md): N token rows, B rows, T tokens, L MoE layers, H hidden width, E experts,
D lookaheads (entry ``j`` is layer ``l + j + 1``).

What is reproduced is the router's *distribution* (softmax, or DeepSeek-V3's normalised sigmoid); selection
details that depend on other tokens or on state (capacity dropping, correction biases, group limits) are the
simulator's business, not part of a distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from speculation.config.model import Gate, RouterConfig, Selection
from speculation.errors import MissingInputError, UserError
from speculation.models.router import Router
from speculation.traces.manifest import SCORES
from speculation.tracing.registry import ADAPTERS

if TYPE_CHECKING:
    from speculation.traces.reader import TraceStore

FAMILIES = tuple(ADAPTERS)  # every traced family: embedded, Switch (classifier.weight), top-k routers (weight)
EMBEDDED = "embedded_switch"


def _router_config(raw: Mapping[str, Any]) -> RouterConfig:
    """The RouterConfig a manifest stored: JSON turned the enums into their values, so turn them back."""
    known = {f.name for f in fields(RouterConfig)}
    values = {"gate": Gate.linear, "selection": Selection.topk} | {k: v for k, v in raw.items() if k in known}
    return RouterConfig.from_json(values)


def _param_keys(family: str) -> tuple[str, str]:
    """(weight key, bias key) of a linear router family's state."""
    return ("classifier.weight", "classifier.bias") if family == "switch_transformers" else ("weight", "bias")


class RouterBank(nn.Module):
    """One frozen router per MoE layer; ``scores(hidden, layer)`` is layer ``layer``'s router applied to ``hidden``.

    Always in eval mode (a noisy gate's noise is a training-time draw of the source model, not part of its
    distribution) and never trained (``requires_grad`` off), even inside a model that is.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        family, score = spec["family"], spec["score"]
        if family not in FAMILIES:
            raise UserError(f"cannot rebuild routers of family {family!r}; supported: {FAMILIES}")
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not one of {SCORES}")
        self.spec = dict(spec)
        self.score = score
        self.layer_names = list(spec["layer_names"])
        self.num_experts, self.hidden_size = int(spec["num_experts"]), int(spec["hidden_size"])
        if family == EMBEDDED:
            if spec.get("router_config") is None:
                raise UserError(
                    "manifest['routing'] has no 'router_config', which is needed to rebuild the embedded router; "
                    "re-collect the traces with this version of spec-collect"
                )
            config = _router_config(spec["router_config"])
            layers = [Router(self.hidden_size, self.num_experts, config) for _ in self.layer_names]
        else:
            layers = [nn.Linear(self.hidden_size, self.num_experts, bias=b) for b in spec["biased"]]
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> RouterBank:
        return super().train(False)

    @classmethod
    def from_parts(
        cls,
        family: str | None,
        layer_names: Sequence[str],
        tensors: Mapping[str, torch.Tensor],
        num_experts: int,
        score: str = "softmax",
        router_config: Mapping[str, Any] | None = None,
    ) -> RouterBank:
        """``tensors`` keyed ``<layer label>.<param>`` (as ``save_router_weights`` writes them); ``score`` and
        ``router_config`` (the embedded model's, needed to rebuild it) as the manifest's routing section has them."""
        if family not in FAMILIES:
            raise UserError(f"cannot rebuild routers of family {family!r}; supported: {FAMILIES}")
        states = []
        for label in layer_names:
            prefix = f"{label}."  # the dot keeps "decoder.1" from claiming "decoder.11.*"
            state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            if not state:
                raise UserError(f"router weights have no tensors for layer {label!r}; re-run spec-collect")
            if family == EMBEDDED:
                # Both gates' first matrix reads the hidden state: linear [E, H], cosine projection [cosine_dim, H].
                first = state.get("weight.weight", state.get("proj.weight"))
                if first is None:
                    raise UserError(f"embedded router weights lack 'weight.weight' and 'proj.weight': {sorted(state)}")
            else:
                weight_key, bias_key = _param_keys(family)
                if weight_key not in state:
                    raise UserError(f"router weights of layer {label!r} have no {weight_key!r}; found {sorted(state)}")
                # DeepSeek-V3's e_score_correction_bias only steers selection; the distribution is the unbiased one.
                first = state[weight_key]
                state = {"weight": state[weight_key]} | ({"bias": state[bias_key]} if bias_key in state else {})
            states.append(state)
        spec = {
            "family": family,
            "score": score,
            "layer_names": list(layer_names),
            "num_experts": num_experts,
            "hidden_size": int(first.shape[1]),
            "router_config": dict(router_config) if router_config is not None else None,
            "biased": ["bias" in state for state in states] if family != EMBEDDED else None,
        }
        bank = cls(spec)
        for layer, state in zip(bank.layers, states, strict=True):
            layer.load_state_dict({k: v.float() for k, v in state.items()})  # strict: another router variant fails
        return bank

    @classmethod
    def from_store(cls, store: TraceStore) -> RouterBank:
        """Load ``router_weights.safetensors`` next to the store's manifest, as its routing section describes."""
        manifest = store.manifest
        path = Path(store.root) / manifest.router_weights_file
        if not path.is_file():
            raise MissingInputError(
                f"{path} is missing: gate lookahead needs the routers' weights, which spec-collect writes when a "
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

    @property
    def span_length(self) -> int:
        return int((self.spec.get("router_config") or {}).get("span_length", 1))

    def scores(self, hidden_NH: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s router scores [..., E] (float32) of hidden states [..., H]."""
        router = self.layers[layer]
        hidden_NH = hidden_NH.float()
        return router.scores(hidden_NH) if isinstance(router, Router) else router(hidden_NH)

    def log_distribution(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Router scores -> log of the routing distribution (:func:`log_distribution` with this bank's score)."""
        return log_distribution(scores_NE, self.score)

    def lookahead_log_probs(self, hidden_BTLH: torch.Tensor, max_lookahead: int) -> torch.Tensor:
        """[B, T, L, D, E]: entry (l, j) is layer ``l + j + 1``'s router applied to the hidden state entering layer
        ``l``, as log-probabilities; 0 (a flat, unnormalised prior) where ``l + j + 1 >= L``."""
        num_layers = hidden_BTLH.shape[2]
        out = hidden_BTLH.new_zeros((*hidden_BTLH.shape[:3], max_lookahead, self.num_experts), dtype=torch.float32)
        for target in range(1, num_layers):
            first = max(0, target - max_lookahead)  # source layers target - D .. target - 1
            scores = self.scores(hidden_BTLH[:, :, first:target], target)
            for source in range(first, target):
                out[:, :, source, target - source - 1] = self.log_distribution(scores[:, :, source - first])
        return out

    def step_log_probs(self, hidden_H: torch.Tensor, layer: int, max_lookahead: int) -> torch.Tensor:
        """[D, E]: :meth:`lookahead_log_probs` of one token at source layer ``layer``."""
        out = hidden_H.new_zeros((max_lookahead, self.num_experts), dtype=torch.float32)
        for j in range(min(max_lookahead, len(self.layers) - layer - 1)):
            out[j] = self.log_distribution(self.scores(hidden_H, layer + j + 1))
        return out


def log_distribution(scores_NE: torch.Tensor, score: str) -> torch.Tensor:
    """Router scores -> log of the routing distribution (softmax, or sigmoid normalised to sum to 1): the one
    function gate lookahead applies, to router outputs and to stored lookahead scores alike."""
    if score == "sigmoid":
        log_sigmoid_NE = F.logsigmoid(scores_NE)
        return log_sigmoid_NE - torch.logsumexp(log_sigmoid_NE, dim=-1, keepdim=True)
    return F.log_softmax(scores_NE, dim=-1)


def random_bank(num_layers: int, num_experts: int, hidden_size: int, seed: int = 0) -> RouterBank:
    """Linear routers with random weights: for tests and benchmarks that need a bank of a given geometry."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"moe.{layer}" for layer in range(num_layers)]
    tensors = {f"{name}.weight": torch.randn(num_experts, hidden_size, generator=generator) for name in names}
    return RouterBank.from_parts("mixtral", names, tensors, num_experts)
