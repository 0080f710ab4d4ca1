"""Read a trace split as :class:`~speculation.predictors.base.TraceBatch` blocks of whole sequences.

Shape legend: N token rows, L MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from speculation.predictors.base import TraceBatch
from speculation.traces import TraceSplit


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


def load_batch(split: TraceSplit, rows: slice, score: str, hidden_layers: list[int] | None) -> TraceBatch:
    """Rows ``rows`` of ``split`` (whole sequences) in float32 / int64, with the router's distributions.

    ``hidden_layers``: the MoE layers the split's hidden array holds (manifest ``hidden.layers``); None skips it.
    """
    fields = ["experts", "gates", "logits", "seq", "pos", "doc"]
    if hidden_layers and "hidden" in split.fields:
        fields.append("hidden")
    data = split.rows(np.arange(rows.start, rows.stop), fields=fields)
    seq = data["seq"].astype(np.int64)
    return TraceBatch(
        experts_NLK=data["experts"].astype(np.int64),
        gates_NLK=data["gates"].astype(np.float32),
        logits_NLE=data["logits"].astype(np.float32),
        probs_NLE=router_distribution(data["logits"], score),
        hidden_NLH=data["hidden"].astype(np.float32) if "hidden" in data else None,
        hidden_layers=list(hidden_layers) if "hidden" in data else [],
        seq_N=seq,
        pos_N=data["pos"].astype(np.int64),
        doc_N=data["doc"].astype(np.int64),
        prev_N=previous_rows(seq),
    )


def iter_batches(split: TraceSplit, score: str, max_rows: int, hidden_layers: list[int] | None) -> Iterator[TraceBatch]:
    """The whole split, block by block (bounded memory)."""
    for rows in sequence_blocks(split.array("seq"), max_rows):
        yield load_batch(split, rows, score, hidden_layers)
