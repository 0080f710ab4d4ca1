"""What a trace costs on disk: bytes per traced token of each field, from the store's own dtypes.

The trace store keeps, per token, the routing of every MoE layer and (optionally) the hidden state entering
chosen routers. The hidden states dominate for big models: Mixtral-8x7B's 32 layers of width 4096 in float16 are
256 KiB per token; the compact options (stored gate-lookahead logits, a random projection) keep what the
predictors read in far less. :func:`bytes_per_token` says how much each option costs before a run, for any geometry;
``tests/test_stage_collect.py`` and ``tests/test_compact_traces.py`` hold it equal to what written stores hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from speculation.traces.store import TRACE_FIELDS

_PER_TOKEN_FIELDS = ("token", "doc", "pos", "seq")


@dataclass(frozen=True)
class TraceGeometry:
    """The sizes that fix a trace's width: MoE layers L, experts E, slots per token K, hidden width H."""

    name: str
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int


# Geometries from the models' published configs (decoder stack for the encoder-decoder Switch models).
KNOWN_GEOMETRIES = (
    TraceGeometry("switch-base-8", num_layers=6, num_experts=8, experts_per_token=1, hidden_size=768),
    TraceGeometry("switch-base-128", num_layers=6, num_experts=128, experts_per_token=1, hidden_size=768),
    TraceGeometry("mixtral-8x7b", num_layers=32, num_experts=8, experts_per_token=2, hidden_size=4096),
    TraceGeometry("qwen3-30b-a3b", num_layers=48, num_experts=128, experts_per_token=8, hidden_size=2048),
)


def bytes_per_token(
    geometry: TraceGeometry, hidden_layers: int | None = None, lookahead: int = 0, projection: int | None = None
) -> dict[str, int]:
    """Bytes each stored field takes per token, and their ``total``; ``hidden_layers``: how many layers' hidden
    states are kept (None: every MoE layer, as ``trace.hidden_layers=null``; 0: ``trace.save_hidden=false``);
    ``lookahead``: ``trace.gate_lookahead`` (0 for null); ``projection``: ``trace.hidden_projection`` (the stored
    width). ``trace.hidden_dtype`` changes no size: bfloat16 and float16 both take 2 bytes."""
    L, E, K, H = geometry.num_layers, geometry.num_experts, geometry.experts_per_token, geometry.hidden_size
    kept = L if hidden_layers is None else hidden_layers
    elements = {"experts": L * K, "gates": L * K, "dropped": L * K, "logits": L * E}
    elements |= dict.fromkeys(_PER_TOKEN_FIELDS, 1)
    if kept:
        elements["hidden"] = kept * (projection or H)
    if lookahead:
        elements["lookahead_logits"] = L * lookahead * E
    sizes = {name: count * TRACE_FIELDS[name].itemsize for name, count in elements.items()}
    return {**sizes, "total": sum(sizes.values())}
