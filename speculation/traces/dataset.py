"""Views of a trace split for analysis (a long pandas frame) and for training (a torch Dataset of windows).

Shape legend (docs/glossary.md): N token rows (of the real tokens), L MoE layers, K expert slots per token,
T tokens of a window (padded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from speculation.traces.reader import TraceSplit

_ROUTING_COLUMNS = ("experts", "gates", "token", "doc", "pos", "seq")


def _row_indices(split: TraceSplit, rows: slice | np.ndarray | None) -> np.ndarray:
    if rows is None:
        return np.arange(split.num_rows, dtype=np.int64)
    if isinstance(rows, slice):
        return np.arange(split.num_rows, dtype=np.int64)[rows]
    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        if rows.shape != (split.num_rows,):
            raise ValueError(f"a boolean row mask needs shape ({split.num_rows},), got {rows.shape}")
        return np.flatnonzero(rows)
    return rows


def routing_frame(split: TraceSplit, rows: slice | np.ndarray | None = None) -> pd.DataFrame:
    """Long routing table, one row per (token row, layer, rank), ordered that way.

    Columns: row (int64), doc, pos, seq, token (int32), layer, rank, expert (int16; -1 = dropped/unused slot,
    kept so counts per token stay K), gate (float32). ``layer`` indexes ``TraceStore.layer_names``.
    ``rows`` selects global rows: a slice, an index array, a boolean mask [N], or None for all.
    """
    idx_N = _row_indices(split, rows)
    data = split.rows(idx_N, fields=_ROUTING_COLUMNS)
    experts_NLK = data["experts"]
    num_rows, num_layers, k = experts_NLK.shape
    slots = num_layers * k
    columns = {"row": np.repeat(idx_N.astype(np.int64), slots)}
    columns |= {name: np.repeat(data[name], slots) for name in ("doc", "pos", "seq", "token")}
    columns["layer"] = np.tile(np.repeat(np.arange(num_layers, dtype=np.int16), k), num_rows)
    columns["rank"] = np.tile(np.arange(k, dtype=np.int16), num_rows * num_layers)
    columns["expert"] = experts_NLK.reshape(-1)
    columns["gate"] = data["gates"].reshape(-1).astype(np.float32)
    return pd.DataFrame(columns)


class SequenceDataset(Dataset):
    """Windows of consecutive rows of one traced sequence, padded to a common length T.

    Items are runs of rows with the same ``seq`` cut into windows of at most ``window`` rows (None = whole
    sequences, padded to the longest). ``item[field]`` is [T, ...] (integer fields -> long, float fields ->
    float32; padded ``experts`` are -1, other padding 0), ``item["mask"]`` bool [T] is True on real rows and
    ``item["rows"]`` long [T] holds global row indices (-1 on padding). Equal lengths let the default
    DataLoader collate stack items.
    """

    def __init__(
        self,
        split: TraceSplit,
        fields: Sequence[str] = ("experts", "gates", "logits"),
        window: int | None = None,
    ) -> None:
        unknown = [name for name in fields if name not in split.fields]
        if unknown:
            raise ValueError(f"split {split.name!r} has no field(s) {unknown}; it has {list(split.fields)}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.split = split
        self.fields = tuple(fields)
        seq_N = split.array("seq")
        # Rows are ordered by (seq, pos), so each sequence is one contiguous run.
        run_starts = np.flatnonzero(np.r_[True, seq_N[1:] != seq_N[:-1]]) if len(seq_N) else np.zeros(0, np.int64)
        run_ends = np.r_[run_starts[1:], len(seq_N)].astype(np.int64)
        run_lengths = run_ends - run_starts
        if window is None:
            self.starts, self.lengths = run_starts.astype(np.int64), run_lengths
            self.window = int(run_lengths.max(initial=0))
        else:
            windows_per_run = -(-run_lengths // window)  # ceil
            run_of_item = np.repeat(np.arange(len(run_starts)), windows_per_run)
            first_item_of_run = np.cumsum(windows_per_run) - windows_per_run
            index_in_run = np.arange(len(run_of_item)) - np.repeat(first_item_of_run, windows_per_run)
            self.starts = run_starts[run_of_item].astype(np.int64) + index_in_run * window
            self.lengths = np.minimum(window, run_ends[run_of_item] - self.starts)
            self.window = window

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} windows")
        start, length = int(self.starts[index]), int(self.lengths[index])
        rows_N = np.arange(start, start + length, dtype=np.int64)
        data = self.split.rows(rows_N, fields=self.fields)
        item: dict[str, torch.Tensor] = {}
        for name, values_N in data.items():
            is_int = values_N.dtype.kind in "iu"
            padded_T = np.full(
                (self.window, *values_N.shape[1:]),
                -1 if name == "experts" else 0,
                dtype=np.int64 if is_int else np.float32,
            )
            padded_T[:length] = values_N
            item[name] = torch.from_numpy(padded_T)
        mask_T = torch.zeros(self.window, dtype=torch.bool)
        mask_T[:length] = True
        rows_T = torch.full((self.window,), -1, dtype=torch.long)
        rows_T[:length] = torch.from_numpy(rows_N)
        item["mask"], item["rows"] = mask_T, rows_T
        return item
