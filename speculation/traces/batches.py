"""Read a trace split as :class:`TraceBatch` blocks of whole sequences: what every predictor, the evaluator and
the simulator consume.

Shape legend (docs/glossary.md): N token rows (whole sequences, in (seq, pos) order), L MoE layers, K expert slots,
E experts, H hidden width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from speculation.traces.reader import TraceStore


@dataclass
class TraceBatch:
    """A block of whole traced sequences, as float32/int64 numpy arrays."""

    experts_NLK: np.ndarray  # int64, -1 = dropped/unused slot
    gates_NLK: np.ndarray  # float32
    logits_NLE: np.ndarray  # float32, the router's scores
    probs_NLE: np.ndarray  # float32, the router's distribution (softmax, or normalised sigmoid scores)
    hidden_NLH: np.ndarray | None  # float32 router inputs of the layers in hidden_layers (its L axis is Lh), or None
    hidden_layers: list[int]  # which MoE layers hidden_NLH holds, in order
    seq_N: np.ndarray  # int64 traced-sequence id
    pos_N: np.ndarray  # int64 position in the document
    doc_N: np.ndarray  # int64 document index
    prev_N: np.ndarray  # int64 row index (within this batch) of the previous token of the same sequence, or -1
    # float32 stored gate-lookahead scores (trace.gate_lookahead): entry (l, j) is router l + j + 1 on the input of l
    lookahead_NLDE: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.experts_NLK.shape[0]

    def hidden_at(self, layer: int) -> np.ndarray | None:
        """The hidden state entering ``layer``'s router [N, H], if it was traced."""
        if self.hidden_NLH is None or layer not in self.hidden_layers:
            return None
        return self.hidden_NLH[:, self.hidden_layers.index(layer)]


def router_distribution(logits_NLE: np.ndarray, score: str) -> np.ndarray:
    """The router's distribution over experts: softmax of its logits, or normalised sigmoid scores."""
    logits = logits_NLE.astype(np.float32)
    if score == "sigmoid":  # DeepSeek-V3 scores experts independently; normalise to compare distributions
        scores = 1.0 / (1.0 + np.exp(-logits))
        return scores / scores.sum(-1, keepdims=True)
    if score != "softmax":
        raise ValueError(f"unknown router score function {score!r}; expected softmax or sigmoid.")
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def previous_rows(seq_N: np.ndarray) -> np.ndarray:
    """Index of each row's predecessor in the same sequence (rows are in (seq, pos) order), or -1."""
    prev = np.arange(len(seq_N)) - 1
    starts = np.ones(len(seq_N), dtype=bool)
    starts[1:] = seq_N[1:] != seq_N[:-1]
    prev[starts] = -1
    return prev


def would_be_misses(experts_NK: np.ndarray, prev_N: np.ndarray, window: int) -> np.ndarray:
    """[N] bool: the router's top-1 expert (slot 0) was used by none of the previous ``window`` tokens of the same
    sequence (``prev_N`` chains them; -1 ends a sequence) at this layer."""
    top1_N = experts_NK[:, 0]
    seen_N = np.zeros(len(top1_N), dtype=bool)
    rows_N = prev_N
    for _ in range(window):
        has_N = rows_N >= 0
        safe_N = np.where(has_N, rows_N, 0)
        seen_N |= has_N & (experts_NK[safe_N] == top1_N[:, None]).any(1)
        rows_N = np.where(has_N, prev_N[safe_N], -1)
    return ~seen_N


def sequence_blocks(seq_N: np.ndarray, max_rows: int) -> list[slice]:
    """Consecutive row ranges of whole sequences, each about ``max_rows`` long (a longer sequence stays whole)."""
    starts = np.flatnonzero(np.r_[True, seq_N[1:] != seq_N[:-1]])
    bounds, block_start = [], 0
    for start in starts[1:]:
        if start - block_start >= max_rows:
            bounds.append(slice(block_start, int(start)))
            block_start = int(start)
    if len(seq_N) > block_start:
        bounds.append(slice(block_start, len(seq_N)))
    return bounds


def load_batch(store: TraceStore, split: str, rows: slice, hidden: bool = True) -> TraceBatch:
    """Rows ``rows`` of ``split`` (whole sequences) in float32 / int64, with the router's distributions.

    ``hidden``: read the predictors' per-layer inputs too, if the store has them: the traced hidden states (the
    layers ``manifest.hidden.layers`` lists) and the stored gate-lookahead scores.
    """
    trace = store.split(split)
    hidden_layers = store.manifest.hidden.layers if hidden else []
    fields = ["experts", "gates", "logits", "seq", "pos", "doc"]
    if hidden_layers and "hidden" in trace.fields:
        fields.append("hidden")
    if hidden and "lookahead_logits" in trace.fields:
        fields.append("lookahead_logits")
    data = trace.rows(np.arange(rows.start, rows.stop), fields=fields)
    seq = data["seq"].astype(np.int64)
    return TraceBatch(
        experts_NLK=data["experts"].astype(np.int64),
        gates_NLK=data["gates"].astype(np.float32),
        logits_NLE=data["logits"].astype(np.float32),
        probs_NLE=router_distribution(data["logits"], store.manifest.routing.score),
        hidden_NLH=data["hidden"].astype(np.float32) if "hidden" in data else None,
        hidden_layers=list(hidden_layers) if "hidden" in data else [],
        seq_N=seq,
        pos_N=data["pos"].astype(np.int64),
        doc_N=data["doc"].astype(np.int64),
        prev_N=previous_rows(seq),
        lookahead_NLDE=data["lookahead_logits"].astype(np.float32) if "lookahead_logits" in data else None,
    )


def iter_batches(store: TraceStore, split: str, max_rows: int) -> Iterator[TraceBatch]:
    """The whole split, block by block of about ``max_rows`` rows (bounded memory)."""
    for rows in sequence_blocks(store.split(split).array("seq"), max_rows):
        yield load_batch(store, split, rows)


def first_rows(store: TraceStore, split: str, max_tokens: int) -> slice:
    """The first whole sequences of ``split`` holding about ``max_tokens`` tokens (what the simulator replays)."""
    return sequence_blocks(store.split(split).array("seq"), max_tokens)[0]
