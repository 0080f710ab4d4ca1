"""Reading routing traces: ``TraceStore.open(root)`` checks the manifest (and every shard's sha256), then
hands out :class:`TraceSplit` views whose shards are memory-mapped with ``np.load(mmap_mode="r")``.

Shape legend (docs/glossary.md): N token rows, L MoE layers, K max experts per token, E experts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speculation.errors import MissingInputError, UserError
from speculation.io import file_sha256
from speculation.traces.manifest import COLLECT_FIX, SCHEMA_VERSION, Manifest, TraceFormatError
from speculation.traces.store import ShardInfo, _load_shard, from_bfloat16_bits
from speculation.workdir import MANIFEST_FILE, TOKENS_FILE, Workdir


class TraceSplit:
    """One split: memory-mapped shards plus row gathers across them."""

    def __init__(self, directory: Path, name: str, entry: Mapping[str, Any], hidden_dtype: str = "float16") -> None:
        self.directory = Path(directory)
        self.name = name
        self.hidden_dtype = hidden_dtype  # manifest.hidden.dtype: bfloat16 bits are decoded to float32 on read
        self.infos = [ShardInfo.from_dict(shard) for shard in entry["shards"]]
        self._expected_rows = int(entry["rows"])
        self._open()

    def _open(self) -> None:
        if not self.infos:
            raise TraceFormatError(f"split {self.name!r} in the manifest has no shards; {COLLECT_FIX}")
        self.shards: list[dict[str, np.ndarray]] = [
            _load_shard(self.directory / i.name, i, self.hidden_dtype) for i in self.infos
        ]
        self.fields: tuple[str, ...] = tuple(self.shards[0])
        for info, shard in zip(self.infos, self.shards, strict=True):
            if tuple(shard) != self.fields:
                raise TraceFormatError(
                    f"{self.directory / info.name} has fields {tuple(shard)}, the first shard {self.fields}; "
                    f"delete {self.directory} and {COLLECT_FIX}"
                )
        # offsets[s] is the global row of shard s's first row; offsets[-1] == num_rows.
        self.offsets = np.cumsum([0] + [info.rows for info in self.infos], dtype=np.int64)
        self.num_rows = int(self.offsets[-1])
        if self.num_rows != self._expected_rows:
            raise TraceFormatError(
                f"split {self.name!r} has {self.num_rows} rows in its shards but the manifest says "
                f"{self._expected_rows}; {COLLECT_FIX}"
            )

    # Memory maps would be pickled as full copies (e.g. to spawned DataLoader workers), so re-open instead.
    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "shards"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def _check_fields(self, fields: Sequence[str]) -> None:
        unknown = [name for name in fields if name not in self.fields]
        if unknown:
            raise ValueError(f"split {self.name!r} has no field(s) {unknown}; it has {list(self.fields)}")

    def _decoded(self, field: str, values: np.ndarray) -> np.ndarray:
        """Stored values as every consumer reads them: bfloat16 hidden states (uint16 bits) as float32."""
        return from_bfloat16_bits(values) if field == "hidden" and self.hidden_dtype == "bfloat16" else values

    def array(self, field: str) -> np.ndarray:
        """All shards of one field concatenated in memory, e.g. ``experts`` -> [N, L, K]."""
        self._check_fields([field])
        return self._decoded(field, np.concatenate([shard[field] for shard in self.shards]))

    def rows(self, indices: np.ndarray, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gather global rows [M] (any order, repeats allowed) -> {field: [M, ...]}; reads only those rows."""
        fields = self.fields if fields is None else tuple(fields)
        self._check_fields(fields)
        idx_N = np.asarray(indices)
        if idx_N.ndim != 1 or (idx_N.size and idx_N.dtype.kind not in "iu"):
            raise ValueError(f"row indices must be a 1-D integer array, got {idx_N.dtype} {idx_N.shape}")
        idx_N = idx_N.astype(np.int64, copy=False)
        if idx_N.size and (idx_N.min() < 0 or idx_N.max() >= self.num_rows):
            raise IndexError(f"rows span [{idx_N.min()}, {idx_N.max()}], split {self.name!r} has {self.num_rows}")
        first = self.shards[0]
        out = {name: np.empty((len(idx_N), *first[name].shape[1:]), first[name].dtype) for name in fields}
        # Sorting by global row groups the reads per shard and makes each memmap read ascending.
        order = np.argsort(idx_N, kind="stable")
        sorted_idx = idx_N[order]
        bounds = np.searchsorted(sorted_idx, self.offsets)
        for s, shard in enumerate(self.shards):
            lo, hi = bounds[s], bounds[s + 1]
            if lo == hi:
                continue
            local = sorted_idx[lo:hi] - self.offsets[s]
            for name in fields:
                out[name][order[lo:hi]] = shard[name][local]
        return {name: self._decoded(name, values) for name, values in out.items()}

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield each shard as ``{field: read-only memmap}`` in row order (bfloat16 hidden states: float32 copies)."""
        for shard in self.shards:
            yield {name: self._decoded(name, values) for name, values in shard.items()}

    def tokens_frame(self) -> pd.DataFrame:
        """Per-token metadata: columns row, doc, pos, seq, token."""
        path = self.directory / TOKENS_FILE
        if not path.is_file():
            raise MissingInputError(f"{path} is missing; re-run spec-collect (finalizing a split writes it)")
        return pd.read_parquet(path)


class TraceStore:
    """A trace directory opened for reading; use ``TraceStore.open(root)``."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.splits: list[str] = sorted(manifest.splits)
        self.num_experts: int = manifest.routing.num_experts
        self.max_experts_per_token: int = manifest.routing.max_experts_per_token
        self.layer_names: list[str] = manifest.layer_names
        self._split_cache: dict[str, TraceSplit] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @classmethod
    def open(cls, root: Path | str, verify: bool = True) -> TraceStore:
        root = Path(root)
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise MissingInputError(
                f"no trace manifest in {root}; run `spec-collect workdir={Workdir.of_traces(root).root}` first "
                "(an interrupted collection resumes where it stopped)"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise TraceFormatError(f"{path} is not valid JSON ({err}); delete it and re-run spec-collect") from err
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise TraceFormatError(
                f"{path} has trace schema_version {version}, this code reads version {SCHEMA_VERSION}; "
                f"re-collect the traces: delete {root} and run spec-collect"
            )
        store = cls(root, Manifest.from_dict(raw, source=str(path)))
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Hash every shard file against the manifest; TraceFormatError on the first mismatch."""
        for split_name in self.splits:
            for shard in self.manifest.splits[split_name]["shards"]:
                info = ShardInfo.from_dict(shard)
                shard_dir = self.root / split_name / info.name
                fix = f"delete {shard_dir} and {COLLECT_FIX}"
                for file_name, expected in sorted(info.sha256.items()):
                    path = shard_dir / file_name
                    if not path.is_file():
                        raise TraceFormatError(f"{path} is missing; {fix}")
                    actual = file_sha256(path)
                    if actual != expected:
                        raise TraceFormatError(
                            f"{path} is corrupted: sha256 {actual[:16]}… differs from the manifest's "
                            f"{expected[:16]}…; {fix}"
                        )

    def split(self, name: str) -> TraceSplit:
        if name not in self.manifest.splits:
            raise UserError(f"no split {name!r} in {self.root}; available splits: {self.splits}")
        if name not in self._split_cache:
            split = TraceSplit(self.root / name, name, self.manifest.splits[name], self.manifest.hidden.dtype)
            self._check_geometry(split)
            self._split_cache[name] = split
        return self._split_cache[name]

    def _check_geometry(self, split: TraceSplit) -> None:
        num_layers = len(self.layer_names)
        expected = {
            "experts": (num_layers, self.max_experts_per_token),
            "logits": (num_layers, self.num_experts),
        }
        depth = self.manifest.lookahead_depth
        if depth or "lookahead_logits" in split.fields:
            expected["lookahead_logits"] = (num_layers, depth, self.num_experts)
        for name, trailing in expected.items():
            shape = split.shards[0][name].shape if name in split.fields else None
            if shape is None or shape[1:] != trailing:
                raise TraceFormatError(
                    f"{split.directory / split.infos[0].name}/{name}.npy has shape {shape}, the manifest implies "
                    f"[N, {', '.join(map(str, trailing))}]; delete {self.root} and re-run spec-collect"
                )
