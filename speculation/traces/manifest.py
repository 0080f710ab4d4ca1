"""The typed view of a trace store's ``manifest.json``: the facts every later stage reads about the traces.

``spec-collect`` writes the manifest last (it marks a complete store); everything after reads it through
:class:`Manifest` instead of dict lookups, so each fact has one spelling and one default::

    {
      "schema_version": 2,
      "stack": "decoder",                          # the token stream of this store ("encoder": its own store)
      "other_stacks": {"encoder": "encoder"},       # relative paths of the same run's other stores
      "adapter": "embedded_switch",                 # the model family (speculation/tracing/registry.py)
      "model": {"kind": "embedded" | "hf", "name", "weights_sha256", "tokenizer_sha256", "config_sha256",
                "source_dir": "../source_model" (embedded) | "path" (hf),
                "trained_on_corpus": the corpus fingerprint of a model traced elsewhere (model.source_workdir)},
      "geometry": {"d_model", "d_ff", "num_experts", "top_k", "num_layers", "moe_layers", "dtype",
                   "bytes_per_expert", "vocab_size", ...family-specific keys},
      "routing": {"num_experts", "max_experts_per_token", "layers": [router labels], "score": "softmax"|"sigmoid",
                  "router_config": {...} (embedded), ...family-specific knobs},
      "hidden": {"layers": [MoE-layer indices], "size": H (P when projected), "source": "the router's input",
                 "projection": {"width": P, "input_size": H, "seed", "file": "hidden_projection.safetensors"}
                 (only with trace.hidden_projection)},
      "lookahead": {"depth": D, "fill": 0.0, "field": "lookahead_logits", "source"} (only with trace.gate_lookahead),
      "dtypes": {field: numpy dtype; "hidden": "float16" | "bfloat16"}, "router_weights": {"file", "format"},
      "splits": {name: {"rows", "shards": [{"name", "rows", "sha256": {file: digest}, "ranges": {field: [lo, hi]}}]}},
      "corpus": {...}, "documents": "documents.parquet", "trace_config": {...}, "source_metrics": {...} | null,
      "tokenizer": ..., "figures": {...}
    }

:data:`MANIFEST_SCHEMA` (JSON Schema) is checked on every read and write, and :func:`range_problems` checks each
shard's recorded value ranges against the geometry (an expert id >= E is refused when the store opens, not when
an index error surfaces mid-training). The compact-trace entries (``hidden.projection``, ``lookahead``,
``dtypes.hidden = "bfloat16"``) are written only when their option is set, and read as absent = off: a manifest
written before they existed reads as the full float16 trace it is. The fingerprint is the model's content
digests, the stack and the geometry: it ties predictors to the model whose routing they learned, whatever corpus
traced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema

from speculation.config.collect import HIDDEN_DTYPES
from speculation.config.rules import Geometry
from speculation.errors import UserError
from speculation.identity import json_sha256
from speculation.workdir import MANIFEST_FILE, ROUTER_WEIGHTS_FILE

SCHEMA_VERSION = 2
COLLECT_FIX = "re-run spec-collect to rewrite it"
SCORES = ("softmax", "sigmoid")
RANGED_FIELDS = ("experts", "token", "doc", "pos", "seq")  # integer fields whose [min, max] each shard records

_COUNT = {"type": "integer", "minimum": 1}
_DIGEST = {"type": "string", "minLength": 1}
_GEOMETRY_COUNTS = ("d_model", "d_ff", "num_experts", "top_k", "num_layers", "bytes_per_expert")
_SHARD = {
    "type": "object",
    "required": ["name", "rows", "sha256", "ranges"],
    "properties": {
        "name": {"type": "string", "pattern": "^shard-[0-9]{5}$"},
        "rows": {"type": "integer", "minimum": 0},
        "sha256": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "ranges": {
            "type": "object",
            "required": list(RANGED_FIELDS),
            "additionalProperties": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        },
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "stack", "adapter", "model", "geometry", "routing", "hidden", "splits"],
    "properties": {
        "schema_version": {"type": "integer"},
        "stack": {"enum": ["decoder", "encoder"]},
        "adapter": {"type": "string"},
        "model": {
            "type": "object",
            "required": ["kind", "name", "weights_sha256", "tokenizer_sha256", "config_sha256"],
            "properties": {
                "kind": {"enum": ["embedded", "hf"]},
                "name": {"type": "string"},
                "weights_sha256": _DIGEST,
                "tokenizer_sha256": _DIGEST,
                "config_sha256": _DIGEST,
            },
        },
        "geometry": {
            "type": "object",
            "required": ["d_model", "d_ff", "num_experts", "top_k", "num_layers", "moe_layers", "bytes_per_expert"],
            "properties": {
                **{
                    key: _COUNT for key in ("d_model", "d_ff", "num_experts", "top_k", "num_layers", "bytes_per_expert")
                },
                "moe_layers": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                "vocab_size": _COUNT,
            },
        },
        "routing": {
            "type": "object",
            "required": ["num_experts", "max_experts_per_token", "layers", "score"],
            "properties": {
                "num_experts": _COUNT,
                "max_experts_per_token": _COUNT,
                "layers": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "score": {"enum": list(SCORES)},
                "router_config": {"type": ["object", "null"]},
            },
        },
        "hidden": {
            "type": "object",
            "required": ["layers", "size"],
            "properties": {
                "layers": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "size": {"type": "integer", "minimum": 0},
                "projection": {
                    "type": "object",
                    "required": ["width", "input_size", "seed", "file"],
                    "properties": {
                        "width": _COUNT,
                        "input_size": _COUNT,
                        "seed": {"type": "integer", "minimum": 0},
                        "file": {"type": "string"},
                    },
                },
            },
        },
        "lookahead": {
            "type": "object",
            "required": ["depth", "fill"],
            "properties": {"depth": _COUNT, "fill": {"type": "number"}},
        },
        "dtypes": {"type": "object", "properties": {"hidden": {"enum": list(HIDDEN_DTYPES)}}},
        "splits": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["rows", "shards"],
                "properties": {"rows": {"type": "integer", "minimum": 0}, "shards": {"type": "array", "items": _SHARD}},
            },
        },
        "router_weights": {"type": "object", "required": ["file", "format"]},
    },
}


class TraceFormatError(UserError):
    """A trace store on disk is corrupted or was written by an incompatible version."""


@dataclass(frozen=True)
class Routing:
    num_experts: int  # E
    max_experts_per_token: int  # K: expert slots per token and layer
    layers: list[str]  # router labels, one per MoE layer (L of them)
    score: str  # how logits become the routing distribution: softmax, or DeepSeek-V3's normalised sigmoid
    router_config: dict[str, Any] | None  # the embedded model's RouterConfig (enums as their values)


@dataclass(frozen=True)
class Projection:
    """``trace.hidden_projection``: the stored hidden states are ``hidden @ matrix`` ([H, P], in ``file``)."""

    width: int  # P
    input_size: int  # H, the model's hidden width
    seed: int  # trace.projection_seed
    file: str  # next to the manifest


@dataclass(frozen=True)
class Hidden:
    layers: list[int]  # MoE-layer indices whose router input was saved, in the order of the hidden array
    size: int  # width of the stored hidden states: H, or P when projected (0 when none was saved)
    dtype: str = "float16"  # trace.hidden_dtype (bfloat16 is stored as its raw bits; readers see float32)
    projection: Projection | None = None  # None: the router's input as it was

    def describe(self) -> str:
        """What the store keeps of the hidden states, for error messages."""
        if not self.layers:
            return "no hidden states (trace.save_hidden=false)"
        projected = f", projected to width {self.projection.width}" if self.projection else ""
        return f"the {self.dtype} hidden states of MoE layers {self.layers}{projected}"


@dataclass(frozen=True)
class Manifest:
    """One store's manifest: typed fields for what the stages read, ``raw`` for the rest (and for writing)."""

    raw: dict[str, Any]
    routing: Routing
    hidden: Hidden
    stack: str
    adapter: str  # the model family (speculation/tracing/registry.py)
    lookahead_depth: int = 0  # D of the lookahead_logits field (trace.gate_lookahead); 0: not stored

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Parse ``raw`` (read from ``source``); a ``TraceFormatError`` naming what is wrong otherwise."""
        if problem := manifest_problem(raw):
            raise TraceFormatError(f"{source}: {problem}; delete the store and re-run spec-collect")
        routing, hidden = raw["routing"], raw["hidden"]
        return cls(
            raw=raw,
            routing=Routing(
                num_experts=int(routing["num_experts"]),
                max_experts_per_token=int(routing["max_experts_per_token"]),
                layers=list(routing["layers"]),
                score=routing["score"],
                router_config=routing.get("router_config"),
            ),
            hidden=Hidden(
                layers=[int(i) for i in hidden["layers"]],
                size=int(hidden["size"]),
                dtype=(raw.get("dtypes") or {}).get("hidden", "float16"),
                projection=Projection(**hidden["projection"]) if hidden.get("projection") else None,
            ),
            stack=str(raw["stack"]),
            adapter=raw["adapter"],
            lookahead_depth=int((raw.get("lookahead") or {}).get("depth", 0)),
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
        return self.raw["geometry"]

    @property
    def router_weights_file(self) -> str:
        return (self.raw.get("router_weights") or {}).get("file", ROUTER_WEIGHTS_FILE)

    @property
    def router_family(self) -> str | None:
        """The family whose routers ``router_weights`` holds (gate-lookahead rebuilds them)."""
        return (self.raw.get("router_weights") or {}).get("format") or self.adapter

    def missing_hidden(self, layers: range | list[int]) -> list[int]:
        return sorted(set(layers) - set(self.hidden.layers))

    def router_input_problem(self, layers: range | list[int], needs: str) -> str | None:
        """Why these traces cannot feed the traced routers the hidden state entering ``layers`` (``needs``: who
        asks, e.g. "gate_lookahead"), or None: the states must be there and unprojected."""
        missing = self.missing_hidden(layers)
        if not missing and self.hidden.projection is None:
            return None
        cause = f"MoE layers {missing} were not kept" if missing else "they were randomly projected"
        return (
            f"{needs} applies the traced routers to the hidden states, but the traces hold {self.hidden.describe()} "
            f"({cause}); re-collect with trace.save_hidden=true trace.hidden_layers=null trace.hidden_projection=null"
        )

    def fingerprint(self) -> str:
        """Identifies the traced model by content (weights, tokenizer, config), its stack and geometry, not by
        its name, path or corpus: a predictor fitted on other traces of the same model may be scored on these,
        one fitted on another model may not."""
        model = self.raw["model"]
        return json_sha256(
            {
                "weights": model["weights_sha256"],
                "tokenizer": model["tokenizer_sha256"],
                "config": model["config_sha256"],
                "stack": self.stack,
                "geometry": self.geometry,
                "layers": self.routing.layers,
            }
        )


def manifest_problem(manifest: Any) -> str | None:
    """What makes ``manifest`` unreadable (the first schema violation, then any range out of bounds), or None."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "the top level"
        return f"{where}: {error.message}"
    problems = range_problems(manifest)
    return problems[0] if problems else None


def range_problems(manifest: dict[str, Any]) -> list[str]:
    """Each shard's recorded [min, max] against what the geometry allows (expert ids in [-1, E), tokens in
    [0, vocab), positions >= 0), and the routing against the geometry."""
    geometry, routing = manifest["geometry"], manifest["routing"]
    problems = []
    if routing["num_experts"] != geometry["num_experts"]:
        problems.append(
            f"routing.num_experts={routing['num_experts']} but geometry.num_experts={geometry['num_experts']}"
        )
    bad_hidden = [i for i in manifest["hidden"]["layers"] if i >= len(routing["layers"])]
    if bad_hidden:
        problems.append(f"hidden.layers {bad_hidden} are not among the {len(routing['layers'])} MoE layers")
    depth = (manifest.get("lookahead") or {}).get("depth", 0)
    if depth >= len(routing["layers"]):
        problems.append(f"lookahead.depth={depth} leaves the {len(routing['layers'])} MoE layers")
    limits = {"experts": (-1, routing["num_experts"] - 1), "doc": (0, None), "pos": (0, None), "seq": (0, None)}
    limits["token"] = (0, geometry["vocab_size"] - 1 if "vocab_size" in geometry else None)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            for field, (low, high) in limits.items():
                lo, hi = shard["ranges"][field]
                if shard["rows"] and (lo < low or (high is not None and hi > high)):
                    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
                    problems.append(f"{split}/{shard['name']} has {field} values in [{lo}, {hi}], outside {allowed}")
    return problems
