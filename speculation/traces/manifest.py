"""The typed view of a trace store's ``manifest.json``: the facts every later stage reads about the traces.

``spec-collect`` writes the manifest last (it marks a complete store); everything after reads it through
:class:`Manifest` instead of dict lookups, so each fact has one spelling and one default::

    {
      "schema_version": 1,
      "stack": "decoder",                          # the token stream of this store ("encoder": its own store)
      "other_stacks": {"encoder": "encoder"},       # relative paths of the same run's other stores
      "adapter": "embedded_switch",                 # the model family (speculation/tracing/registry.py)
      "model": {"kind": "embedded", "name": ..., "source_dir": "../source_model"} | {"kind": "hf", "path": ...},
      "geometry": {"d_model", "d_ff", "num_experts", "top_k", "num_layers", "moe_layers", "dtype",
                   "bytes_per_expert", "vocab_size", ...family-specific keys},
      "routing": {"num_experts", "max_experts_per_token", "layers": [router labels], "score": "softmax"|"sigmoid",
                  "router_config": {...} (embedded), ...family-specific knobs},
      "hidden": {"layers": [MoE-layer indices], "size": H, "source": "the router's input"},
      "dtypes": {field: numpy dtype}, "router_weights": {"file", "format"},
      "splits": {name: {"rows", "shards": [{"name", "rows", "sha256": {file: digest}}]}},
      "corpus": {...}, "documents": "documents.parquet", "trace_config": {...}, "source_metrics": {...} | null,
      "tokenizer": ..., "figures": {...}
    }
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from speculation.config.rules import Geometry
from speculation.workdir import MANIFEST_FILE, ROUTER_WEIGHTS_FILE

SCHEMA_VERSION = 1
COLLECT_FIX = "re-run spec-collect to rewrite it"
ROUTING_KEYS = {"num_experts", "max_experts_per_token", "layers"}
SCORES = ("softmax", "sigmoid")


class TraceFormatError(ValueError):
    """A trace store on disk is corrupted or was written by an incompatible version."""


@dataclass(frozen=True)
class Routing:
    num_experts: int  # E
    max_experts_per_token: int  # K: expert slots per token and layer
    layers: list[str]  # router labels, one per MoE layer (L of them)
    score: str  # how logits become the routing distribution: softmax, or DeepSeek-V3's normalised sigmoid
    router_config: dict[str, Any] | None  # the embedded model's RouterConfig (enums as their values)


@dataclass(frozen=True)
class Hidden:
    layers: list[int]  # MoE-layer indices whose router input was saved, in the order of the hidden array
    size: int  # H (0 when none was saved)


@dataclass(frozen=True)
class Manifest:
    """One store's manifest: typed fields for what the stages read, ``raw`` for the rest (and for writing)."""

    raw: dict[str, Any]
    routing: Routing
    hidden: Hidden
    stack: str
    adapter: str | None  # model family; None in hand-made stores

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Parse ``raw`` (read from ``source``); a ``TraceFormatError`` naming what is missing otherwise."""
        if problem := manifest_problem(raw):
            raise TraceFormatError(f"{source}: {problem}; delete it and re-run spec-collect")
        routing, hidden = raw["routing"], raw.get("hidden") or {}
        score = routing.get("score", "softmax")
        if score not in SCORES:
            raise TraceFormatError(f"{source}: routing score {score!r} is not one of {SCORES}; {COLLECT_FIX}")
        return cls(
            raw=raw,
            routing=Routing(
                num_experts=int(routing["num_experts"]),
                max_experts_per_token=int(routing["max_experts_per_token"]),
                layers=list(routing["layers"]),
                score=score,
                router_config=routing.get("router_config"),
            ),
            hidden=Hidden(layers=[int(i) for i in hidden.get("layers", [])], size=int(hidden.get("size", 0))),
            stack=str(raw.get("stack", "decoder")),
            adapter=raw.get("adapter"),
        )

    @property
    def layer_names(self) -> list[str]:
        return self.routing.layers

    @property
    def num_layers(self) -> int:
        return len(self.routing.layers)

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def sizes(self) -> Geometry:
        """What the config's rules (``speculation.config.rules``) check against: layers, experts, slots."""
        return Geometry(self.num_layers, self.routing.num_experts, self.routing.max_experts_per_token)

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        return self.raw["splits"]

    @property
    def model_name(self) -> str:
        return str((self.raw.get("model") or {}).get("name"))

    @property
    def geometry(self) -> dict[str, Any]:
        """The traced model's geometry (d_model, d_ff, num_experts, top_k, moe_layers, bytes_per_expert, ...)."""
        return self.raw.get("geometry") or {}

    @property
    def router_weights_file(self) -> str:
        return (self.raw.get("router_weights") or {}).get("file", ROUTER_WEIGHTS_FILE)

    @property
    def router_family(self) -> str | None:
        """The family whose routers ``router_weights`` holds (gate-lookahead rebuilds them)."""
        return (self.raw.get("router_weights") or {}).get("format") or self.adapter

    def missing_hidden(self, layers: range | list[int]) -> list[int]:
        return sorted(set(layers) - set(self.hidden.layers))

    def fingerprint(self) -> str:
        """Identifies the traced model: a predictor fitted on other traces must not be scored on these."""
        identity = {
            "model": self.raw.get("model"),
            "geometry": self.raw.get("geometry"),
            "layers": self.routing.layers,
            "num_experts": self.routing.num_experts,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def manifest_problem(manifest: Any) -> str | None:
    """What a manifest lacks to be read at all (None if nothing)."""
    routing = manifest.get("routing") if isinstance(manifest, dict) else None
    if not isinstance(routing, dict) or not set(routing) >= ROUTING_KEYS:
        return "manifest needs 'routing': {'num_experts', 'max_experts_per_token', 'layers': [names]}"
    if not isinstance(manifest.get("splits"), dict):
        return "manifest needs 'splits': {split name: SplitWriter.finalize(...) result}"
    return None
