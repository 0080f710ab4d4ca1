"""On-disk routing traces: token-major numpy shards, a manifest, and a per-token parquet table.

Layout of a trace directory ``root`` (``workdir/traces``)::

    root/manifest.json          written last, atomically: schema_version, routing, splits, ...
    root/<split>/shard-00000/   one <field>.npy per TRACE_FIELDS entry present, plus meta.json
    root/<split>/tokens.parquet row, doc, pos, seq, token (written by ``SplitWriter.finalize``)

``manifest["splits"][name]`` is what ``SplitWriter.finalize`` returns; ``manifest["routing"]`` is
``{"num_experts", "max_experts_per_token", "layers": [router names]}``.

Shape legend: N token rows (real tokens, ordered by (seq, pos)), L MoE layers, K max experts per token,
E experts, Lh traced hidden layers, H hidden size.

A shard is written into ``shard-XXXXX.tmp/`` and renamed, so a crash leaves either a complete shard or a
``.tmp`` directory that the next writer deletes; a collection resumes at the first incomplete shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

TRACE_FIELDS: dict[str, np.dtype] = {
    "experts": np.dtype(np.int16),  # [N, L, K]; -1 = dropped or unused slot
    "gates": np.dtype(np.float16),  # [N, L, K]
    "dropped": np.dtype(np.bool_),  # [N, L, K]; optional: slot chosen by the router but over capacity
    "logits": np.dtype(np.float16),  # [N, L, E]
    "hidden": np.dtype(np.float16),  # [N, Lh, H]; optional
    "token": np.dtype(np.int32),  # [N]
    "doc": np.dtype(np.int32),  # [N] document index
    "pos": np.dtype(np.int32),  # [N] position inside the document
    "seq": np.dtype(np.int32),  # [N] index of the traced sequence (one model context)
}
REQUIRED_FIELDS: tuple[str, ...] = tuple(name for name in TRACE_FIELDS if name not in ("hidden", "dropped"))
_RANK = {"experts": 3, "gates": 3, "dropped": 3, "logits": 3, "hidden": 3, "token": 1, "doc": 1, "pos": 1, "seq": 1}
_TOKEN_COLUMNS = ("doc", "pos", "seq", "token")
_ROUTING_KEYS = {"num_experts", "max_experts_per_token", "layers"}
_COLLECT_FIX = "re-run spec-collect to rewrite it"


class TraceFormatError(ValueError):
    """A trace store on disk is corrupted or was written by an incompatible version."""


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard: directory name, row count and sha256 of each ``.npy`` file."""

    name: str
    rows: int
    sha256: dict[str, str]  # file name -> hex digest

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "sha256": dict(sorted(self.sha256.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardInfo:
        return cls(name=str(data["name"]), rows=int(data["rows"]), sha256=dict(data["sha256"]))


def _shard_name(index: int) -> str:
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}"


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; a no-op where directories cannot be opened or synced.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_bytes(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _validate(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check fields, ranks and shapes; return C-contiguous arrays in the stored dtypes."""
    unknown = sorted(set(arrays) - set(TRACE_FIELDS))
    if unknown:
        raise ValueError(f"unknown trace field(s) {unknown}; allowed fields are {list(TRACE_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS if name not in arrays]
    if missing:
        raise ValueError(f"missing required trace field(s) {missing}; required: {list(REQUIRED_FIELDS)}")
    out: dict[str, np.ndarray] = {}
    for name, dtype in TRACE_FIELDS.items():
        if name not in arrays:
            continue
        arr = np.asarray(arrays[name])
        if arr.ndim != _RANK[name]:
            raise ValueError(f"field {name!r} must have rank {_RANK[name]}, got shape {arr.shape}")
        if arr.dtype.kind not in "biuf" or (dtype.kind == "i" and arr.dtype.kind == "f"):
            raise ValueError(f"field {name!r} has dtype {arr.dtype}, which cannot be stored as {dtype}")
        if dtype.kind == "i" and arr.size:
            # A silent wrap-around would corrupt expert ids or token ids, so check the range before casting.
            low, high = (-1 if name == "experts" else 0), np.iinfo(dtype).max
            if arr.min() < low or arr.max() > high:
                raise ValueError(f"field {name!r} has values in [{arr.min()}, {arr.max()}], not [{low}, {high}]")
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            cast = np.ascontiguousarray(arr.astype(dtype, copy=False))
        if dtype.kind == "f" and not np.isfinite(cast).all():
            raise ValueError(f"field {name!r} has non-finite values or values beyond float16 range (±65504)")
        out[name] = cast
    experts = out["experts"]
    for name, arr in out.items():
        if arr.shape[0] != experts.shape[0]:
            raise ValueError(f"field {name!r} has {arr.shape[0]} rows but 'experts' has {experts.shape[0]}")
    for name in ("gates", "dropped"):
        if name in out and out[name].shape != experts.shape:
            raise ValueError(f"field {name!r} has shape {out[name].shape}, 'experts' has {experts.shape}")
    if out["logits"].shape[1] != experts.shape[1]:
        raise ValueError(f"field 'logits' has {out['logits'].shape[1]} layers, 'experts' has {experts.shape[1]}")
    return out


def _load_shard(shard_dir: Path, info: ShardInfo) -> dict[str, np.ndarray]:
    """Memory-map every file of a shard; TraceFormatError if one is missing or malformed."""
    fix = f"delete {shard_dir} and {_COLLECT_FIX}"
    arrays: dict[str, np.ndarray] = {}
    for file_name in info.sha256:
        name = file_name.removesuffix(".npy")
        path = shard_dir / file_name
        if name not in TRACE_FIELDS:
            raise TraceFormatError(f"{path} is not a known trace field ({list(TRACE_FIELDS)}); {fix}")
        if not path.is_file():
            raise TraceFormatError(f"{path} is missing; {fix}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise TraceFormatError(f"{path} is not a readable .npy file ({err}); {fix}") from err
        if arr.dtype != TRACE_FIELDS[name] or arr.ndim != _RANK[name] or arr.shape[0] != info.rows:
            raise TraceFormatError(
                f"{path} has dtype {arr.dtype} shape {arr.shape}, expected {TRACE_FIELDS[name]} with rank "
                f"{_RANK[name]} and {info.rows} rows; {fix}"
            )
        arrays[name] = arr
    return {name: arrays[name] for name in TRACE_FIELDS if name in arrays}


class SplitWriter:
    """Writes the shards of one split. Safe to re-create after a crash: stale ``.tmp`` entries are deleted."""

    def __init__(self, root: Path | str, split: str) -> None:
        if not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ValueError(f"split name {split!r} must be a plain directory name")
        self.root = Path(root)
        self.split = split
        self.directory = self.root / split
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in sorted(self.directory.glob("*.tmp")):
            # Left by a writer that died mid-write; its contents are unusable.
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()

    def is_complete(self, index: int) -> bool:
        return (self.directory / _shard_name(index) / "meta.json").is_file()

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray]) -> ShardInfo:
        """Validate, cast and atomically write one shard (see ``TRACE_FIELDS`` for shapes)."""
        cast = _validate(arrays)
        final = self.directory / _shard_name(index)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        digests: dict[str, str] = {}
        for name, arr in cast.items():
            path = tmp / f"{name}.npy"
            with open(path, "wb") as handle:
                np.save(handle, arr, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            digests[path.name] = _file_sha256(path)  # re-read from page cache, hashes exactly what is on disk
        info = ShardInfo(name=final.name, rows=int(cast["experts"].shape[0]), sha256=digests)
        meta = {"rows": info.rows, "sha256": info.to_dict()["sha256"]}
        _write_bytes(tmp / "meta.json", json.dumps(meta, sort_keys=True, indent=2).encode())
        _fsync_dir(tmp)
        if final.exists():  # an explicit rewrite replaces the old shard
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        return info

    def shard_info(self, index: int) -> ShardInfo:
        meta_path = self.directory / _shard_name(index) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"shard {index} of split {self.split!r} is not written: no {meta_path}")
        meta = json.loads(meta_path.read_text())
        return ShardInfo(name=_shard_name(index), rows=int(meta["rows"]), sha256=dict(meta["sha256"]))

    def read_shard(self, index: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Memory-map a complete shard (optionally only ``fields`` that it has)."""
        info = self.shard_info(index)
        shard = _load_shard(self.directory / info.name, info)
        return {name: arr for name, arr in shard.items() if fields is None or name in fields}

    def finalize(self, num_shards: int) -> dict[str, Any]:
        """Check shards ``0..num_shards-1``, write ``tokens.parquet``; return ``{"rows", "shards"}``."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards} (write an empty shard instead)")
        missing = [_shard_name(i) for i in range(num_shards) if not self.is_complete(i)]
        if missing:
            raise ValueError(
                f"split {self.split!r}: {self.directory / missing[0]} is missing or incomplete "
                f"({len(missing)} of {num_shards} shards); re-run spec-collect to write it"
            )
        infos = [self.shard_info(i) for i in range(num_shards)]
        columns: dict[str, list[np.ndarray]] = {name: [] for name in _TOKEN_COLUMNS}
        reference: dict[str, tuple[int, ...]] | None = None
        for info in infos:
            shard = _load_shard(self.directory / info.name, info)
            signature = {name: arr.shape[1:] for name, arr in shard.items()}
            if reference is None:
                reference = signature
            elif signature != reference:
                raise ValueError(
                    f"{self.directory / info.name} has fields/trailing shapes {signature}, {infos[0].name} "
                    f"has {reference}; delete {self.directory} and {_COLLECT_FIX}"
                )
            for name in _TOKEN_COLUMNS:
                columns[name].append(np.asarray(shard[name]))
        rows = sum(info.rows for info in infos)
        columns_N = {name: np.concatenate(parts) for name, parts in columns.items()}
        table = pa.table({"row": np.arange(rows, dtype=np.int64)} | columns_N)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _atomic_write(self.directory / "tokens.parquet", sink.getvalue().to_pybytes())
        return {"rows": rows, "shards": [info.to_dict() for info in infos]}


def _manifest_problem(manifest: Any) -> str | None:
    routing = manifest.get("routing") if isinstance(manifest, dict) else None
    if not isinstance(routing, dict) or not set(routing) >= _ROUTING_KEYS:
        return "manifest needs 'routing': {'num_experts', 'max_experts_per_token', 'layers': [names]}"
    if not isinstance(manifest.get("splits"), dict):
        return "manifest needs 'splits': {split name: SplitWriter.finalize(...) result}"
    return None


def write_manifest(root: Path | str, manifest: dict[str, Any]) -> Path:
    """Set ``manifest["schema_version"]`` and write ``root/manifest.json`` atomically (sorted keys)."""
    if problem := _manifest_problem(manifest):
        raise ValueError(problem)
    manifest["schema_version"] = SCHEMA_VERSION
    path = Path(root) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
    return path


class TraceSplit:
    """One split: memory-mapped shards plus row gathers across them."""

    def __init__(self, directory: Path, name: str, entry: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.name = name
        self.infos = [ShardInfo.from_dict(shard) for shard in entry["shards"]]
        self._expected_rows = int(entry["rows"])
        self._open()

    def _open(self) -> None:
        if not self.infos:
            raise TraceFormatError(f"split {self.name!r} in the manifest has no shards; {_COLLECT_FIX}")
        self.shards: list[dict[str, np.ndarray]] = [_load_shard(self.directory / i.name, i) for i in self.infos]
        self.fields: tuple[str, ...] = tuple(self.shards[0])
        for info, shard in zip(self.infos, self.shards, strict=True):
            if tuple(shard) != self.fields:
                raise TraceFormatError(
                    f"{self.directory / info.name} has fields {tuple(shard)}, the first shard {self.fields}; "
                    f"delete {self.directory} and {_COLLECT_FIX}"
                )
        # offsets[s] is the global row of shard s's first row; offsets[-1] == num_rows.
        self.offsets = np.cumsum([0] + [info.rows for info in self.infos], dtype=np.int64)
        self.num_rows = int(self.offsets[-1])
        if self.num_rows != self._expected_rows:
            raise TraceFormatError(
                f"split {self.name!r} has {self.num_rows} rows in its shards but the manifest says "
                f"{self._expected_rows}; {_COLLECT_FIX}"
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

    def array(self, field: str) -> np.ndarray:
        """All shards of one field concatenated in memory, e.g. ``experts`` -> [N, L, K]."""
        self._check_fields([field])
        return np.concatenate([shard[field] for shard in self.shards])

    def rows(self, indices: np.ndarray, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gather global rows [M] (any order, repeats allowed) -> {field: [M, ...]}; reads only those rows."""
        fields = self.fields if fields is None else tuple(fields)
        self._check_fields(fields)
        idx_M = np.asarray(indices)
        if idx_M.ndim != 1 or (idx_M.size and idx_M.dtype.kind not in "iu"):
            raise ValueError(f"row indices must be a 1-D integer array, got {idx_M.dtype} {idx_M.shape}")
        idx_M = idx_M.astype(np.int64, copy=False)
        if idx_M.size and (idx_M.min() < 0 or idx_M.max() >= self.num_rows):
            raise IndexError(f"rows span [{idx_M.min()}, {idx_M.max()}], split {self.name!r} has {self.num_rows}")
        first = self.shards[0]
        out = {name: np.empty((len(idx_M), *first[name].shape[1:]), first[name].dtype) for name in fields}
        # Sorting by global row groups the reads per shard and makes each memmap read ascending.
        order = np.argsort(idx_M, kind="stable")
        sorted_idx = idx_M[order]
        bounds = np.searchsorted(sorted_idx, self.offsets)
        for s, shard in enumerate(self.shards):
            lo, hi = bounds[s], bounds[s + 1]
            if lo == hi:
                continue
            local = sorted_idx[lo:hi] - self.offsets[s]
            for name in fields:
                out[name][order[lo:hi]] = shard[name][local]
        return out

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield each shard as ``{field: read-only memmap}`` in row order."""
        for shard in self.shards:
            yield dict(shard)

    def tokens_frame(self) -> pd.DataFrame:
        """Per-token metadata: columns row, doc, pos, seq, token."""
        path = self.directory / "tokens.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-run spec-collect (finalizing a split writes it)")
        return pd.read_parquet(path)


class TraceStore:
    """A trace directory opened for reading; use ``TraceStore.open(root)``."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.splits: list[str] = sorted(manifest["splits"])
        routing = manifest["routing"]
        self.num_experts: int = int(routing["num_experts"])
        self.max_experts_per_token: int = int(routing["max_experts_per_token"])
        self.layer_names: list[str] = list(routing["layers"])
        self._split_cache: dict[str, TraceSplit] = {}

    @classmethod
    def open(cls, root: Path | str, verify: bool = True) -> TraceStore:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no trace manifest in {root}; run `spec-collect workdir={root.parent}` first "
                "(an interrupted collection resumes where it stopped)"
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise TraceFormatError(f"{path} is not valid JSON ({err}); delete it and re-run spec-collect") from err
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise TraceFormatError(
                f"{path} has trace schema_version {version}, this code reads version {SCHEMA_VERSION}; "
                f"re-collect the traces: delete {root} and run spec-collect"
            )
        if problem := _manifest_problem(manifest):
            raise TraceFormatError(f"{path}: {problem}; delete it and re-run spec-collect")
        store = cls(root, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Hash every shard file against the manifest; TraceFormatError on the first mismatch."""
        for split_name in self.splits:
            for shard in self.manifest["splits"][split_name]["shards"]:
                info = ShardInfo.from_dict(shard)
                shard_dir = self.root / split_name / info.name
                fix = f"delete {shard_dir} and {_COLLECT_FIX}"
                for file_name, expected in sorted(info.sha256.items()):
                    path = shard_dir / file_name
                    if not path.is_file():
                        raise TraceFormatError(f"{path} is missing; {fix}")
                    actual = _file_sha256(path)
                    if actual != expected:
                        raise TraceFormatError(
                            f"{path} is corrupted: sha256 {actual[:16]}… differs from the manifest's "
                            f"{expected[:16]}…; {fix}"
                        )

    def split(self, name: str) -> TraceSplit:
        if name not in self.manifest["splits"]:
            raise ValueError(f"no split {name!r} in {self.root}; available splits: {self.splits}")
        if name not in self._split_cache:
            split = TraceSplit(self.root / name, name, self.manifest["splits"][name])
            self._check_geometry(split)
            self._split_cache[name] = split
        return self._split_cache[name]

    def _check_geometry(self, split: TraceSplit) -> None:
        num_layers = len(self.layer_names)
        expected = {
            "experts": (num_layers, self.max_experts_per_token),
            "logits": (num_layers, self.num_experts),
        }
        for name, trailing in expected.items():
            shape = split.shards[0][name].shape
            if shape[1:] != trailing:
                raise TraceFormatError(
                    f"{split.directory / split.infos[0].name}/{name}.npy has shape {shape}, manifest routing "
                    f"implies [N, {trailing[0]}, {trailing[1]}]; delete {self.root} and re-run spec-collect"
                )
