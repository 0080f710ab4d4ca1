"""Writing routing traces: token-major numpy shards, a manifest, and a per-token parquet table.

Layout of a trace directory ``root`` (``Workdir.traces()``)::

    root/manifest.json          written last, atomically (its schema: speculation/traces/manifest.py)
    root/<split>/shard-00000/   one <field>.npy per TRACE_FIELDS entry present, plus meta.json
    root/<split>/tokens.parquet row, doc, pos, seq, token (written by ``SplitWriter.finalize``)

``manifest["splits"][name]`` is what ``SplitWriter.finalize`` returns.

Shape legend (docs/glossary.md): N token rows (real tokens, ordered by (seq, pos)), L MoE layers, K expert slots
per token, E experts, Lh traced hidden layers, H hidden width (P when projected), D stored lookaheads.

A shard is written into ``shard-XXXXX.tmp/`` and renamed (:func:`speculation.io.atomic_directory`), so a crash
leaves either a complete shard or a ``.tmp`` directory that the next writer deletes; a collection resumes at the
first incomplete shard. Reading lives in :mod:`speculation.traces.reader`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from speculation.config.collect import HIDDEN_DTYPES
from speculation.errors import UserError
from speculation.io import atomic_directory, atomic_write_bytes, file_sha256, remove_stale_temps
from speculation.traces.manifest import (
    COLLECT_FIX,
    RANGED_FIELDS,
    SCHEMA_VERSION,
    TraceFormatError,
    manifest_problem,
)
from speculation.workdir import MANIFEST_FILE, SHARD_META_FILE, TOKENS_FILE

TRACE_FIELDS: dict[str, np.dtype] = {
    "experts": np.dtype(np.int16),  # [N, L, K]; -1 = dropped or unused slot
    "gates": np.dtype(np.float16),  # [N, L, K]
    "dropped": np.dtype(np.bool_),  # [N, L, K]; optional: slot chosen by the router but over capacity
    "logits": np.dtype(np.float16),  # [N, L, E]
    "hidden": np.dtype(np.float16),  # [N, Lh, H]; optional; bfloat16 bits as uint16 if manifest.dtypes says so
    "lookahead_logits": np.dtype(np.float16),  # [N, L, D, E]; optional: router l+d's scores of the input of l
    "token": np.dtype(np.int32),  # [N]
    "doc": np.dtype(np.int32),  # [N] document index
    "pos": np.dtype(np.int32),  # [N] position inside the document
    "seq": np.dtype(np.int32),  # [N] index of the traced sequence (one model context)
}
OPTIONAL_FIELDS = ("hidden", "dropped", "lookahead_logits")
REQUIRED_FIELDS: tuple[str, ...] = tuple(name for name in TRACE_FIELDS if name not in OPTIONAL_FIELDS)
_RANK = {"experts": 3, "gates": 3, "dropped": 3, "logits": 3, "hidden": 3, "lookahead_logits": 4,
         "token": 1, "doc": 1, "pos": 1, "seq": 1}  # fmt: skip
# trace.hidden_dtype -> the numpy dtype of hidden.npy: numpy has no bfloat16, so its bits are stored as uint16.
_HIDDEN_STORAGE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
_RANGE = {"float16": "±65504", "bfloat16": "±3.39e38"}
_TORCH_HIDDEN = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LOOKAHEAD_FILL = 0.0  # lookahead_logits at (l, d) with no layer l + d: flat scores (manifest.lookahead.fill)
_TOKEN_COLUMNS = ("doc", "pos", "seq", "token")


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard: directory name, row count, sha256 of each ``.npy`` file and the [min, max] of each
    integer field (checked against the geometry when a store opens: ``manifest.range_problems``)."""

    name: str
    rows: int
    sha256: dict[str, str]  # file name -> hex digest
    ranges: dict[str, list[int]]  # RANGED_FIELDS -> [min, max] ([0, -1] for an empty shard)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "sha256": dict(sorted(self.sha256.items())),
                "ranges": dict(sorted(self.ranges.items()))}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardInfo:
        return cls(str(data["name"]), int(data["rows"]), dict(data["sha256"]), dict(data["ranges"]))


def _shard_name(index: int) -> str:
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:05d}"


def field_dtypes(hidden_dtype: str = "float16") -> dict[str, np.dtype]:
    """Each field's dtype on disk for a store whose hidden states are ``hidden_dtype`` (``trace.hidden_dtype``)."""
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype {hidden_dtype!r} is not one of {HIDDEN_DTYPES}")
    return TRACE_FIELDS | {"hidden": _HIDDEN_STORAGE[hidden_dtype]}


def manifest_dtypes(hidden_dtype: str = "float16", lookahead: bool = False) -> dict[str, str]:
    """The manifest's ``dtypes``: each field's dtype by name (``bfloat16`` for bfloat16 bits). The lookahead field
    is listed only in a store that has it, so a default manifest is what it was before that field existed."""
    names = {name: dtype.name for name, dtype in TRACE_FIELDS.items() if name != "lookahead_logits" or lookahead}
    return names | {"hidden": hidden_dtype}


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float values -> their bfloat16 rounding (round to nearest even, as torch casts) as raw uint16 bits."""
    as_float = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def round_hidden(hidden: torch.Tensor, hidden_dtype: str) -> torch.Tensor:
    """``hidden`` as float32 values of what a store of ``hidden_dtype`` holds of it (the same rounding as
    :func:`_cast`: IEEE round to nearest even, in numpy for float16 and torch for bfloat16)."""
    return hidden.float().to(_TORCH_HIDDEN[hidden_dtype]).float()


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16) -> float32, exactly (bfloat16 is float32's upper half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _cast(name: str, arr: np.ndarray, dtype: np.dtype, hidden_dtype: str) -> np.ndarray:
    """``arr`` in its stored dtype; a ValueError for a float that does not fit it (overflow to inf)."""
    if name == "hidden" and hidden_dtype == "bfloat16":
        cast = np.ascontiguousarray(to_bfloat16_bits(arr))
        finite = np.isfinite(from_bfloat16_bits(cast)).all()
    else:
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            cast = np.ascontiguousarray(arr.astype(dtype, copy=False))
        finite = dtype.kind != "f" or np.isfinite(cast).all()
    if not finite:
        kind = hidden_dtype if name == "hidden" else "float16"
        raise ValueError(f"field {name!r} has non-finite values or values beyond {kind} range ({_RANGE[kind]})")
    return cast


def _validate(arrays: Mapping[str, np.ndarray], hidden_dtype: str = "float16") -> dict[str, np.ndarray]:
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
        out[name] = _cast(name, arr, dtype, hidden_dtype)
    experts = out["experts"]
    for name, arr in out.items():
        if arr.shape[0] != experts.shape[0]:
            raise ValueError(f"field {name!r} has {arr.shape[0]} rows but 'experts' has {experts.shape[0]}")
    for name in ("gates", "dropped"):
        if name in out and out[name].shape != experts.shape:
            raise ValueError(f"field {name!r} has shape {out[name].shape}, 'experts' has {experts.shape}")
    for name in ("logits", "lookahead_logits"):
        if name in out and out[name].shape[1] != experts.shape[1]:
            raise ValueError(f"field {name!r} has {out[name].shape[1]} layers, 'experts' has {experts.shape[1]}")
    return out


def _load_shard(shard_dir: Path, info: ShardInfo, hidden_dtype: str = "float16") -> dict[str, np.ndarray]:
    """Memory-map every file of a shard (hidden states as stored: bfloat16 bits stay uint16); TraceFormatError if
    one is missing or malformed."""
    fix = f"delete {shard_dir} and {COLLECT_FIX}"
    dtypes = field_dtypes(hidden_dtype)
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
        if arr.dtype != dtypes[name] or arr.ndim != _RANK[name] or arr.shape[0] != info.rows:
            raise TraceFormatError(
                f"{path} has dtype {arr.dtype} shape {arr.shape}, expected {dtypes[name]} with rank "
                f"{_RANK[name]} and {info.rows} rows; {fix}"
            )
        arrays[name] = arr
    return {name: arrays[name] for name in TRACE_FIELDS if name in arrays}


class SplitWriter:
    """Writes the shards of one split. Safe to re-create after a crash: stale ``.tmp`` entries are deleted, unless
    ``remove_temps`` is false (a rank of a multi-rank collection: another rank may be writing one right now)."""

    def __init__(self, root: Path | str, split: str, hidden_dtype: str = "float16", remove_temps: bool = True) -> None:
        if not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ValueError(f"split name {split!r} must be a plain directory name")
        field_dtypes(hidden_dtype)  # a bad name fails here, before any shard
        self.root = Path(root)
        self.split = split
        self.hidden_dtype = hidden_dtype  # trace.hidden_dtype
        self.directory = self.root / split
        self.directory.mkdir(parents=True, exist_ok=True)
        if remove_temps:
            remove_stale_temps(self.directory)  # left by a writer that died mid-write; their contents are unusable

    def is_complete(self, index: int) -> bool:
        """The shard's ``meta.json`` exists and every file it lists is there with its recorded size.

        A shard whose files do not match its marker (a crash or a concurrent writer, say) counts as missing, so
        the next collection rewrites it instead of failing on it forever.
        """
        shard_dir = self.directory / _shard_name(index)
        try:
            meta = json.loads((shard_dir / SHARD_META_FILE).read_text())
            sizes = dict(meta["bytes"])
            if set(sizes) != set(meta["sha256"]):
                return False
            return all((shard_dir / name).stat().st_size == size for name, size in sizes.items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray]) -> ShardInfo:
        """Validate, cast and atomically write one shard (see ``TRACE_FIELDS`` for shapes)."""
        cast = _validate(arrays, self.hidden_dtype)
        final = self.directory / _shard_name(index)
        digests: dict[str, str] = {}
        with atomic_directory(final) as tmp:
            for name, arr in cast.items():
                path = tmp / f"{name}.npy"
                with open(path, "wb") as handle:
                    np.save(handle, arr, allow_pickle=False)
                digests[path.name] = file_sha256(path)  # re-read from page cache, hashes exactly what is on disk
            ranges = {
                name: [int(cast[name].min()), int(cast[name].max())] if cast[name].size else [0, -1]
                for name in RANGED_FIELDS
            }
            info = ShardInfo(name=final.name, rows=int(cast["experts"].shape[0]), sha256=digests, ranges=ranges)
            sizes = {name: (tmp / name).stat().st_size for name in digests}
            meta = {"rows": info.rows, "sha256": info.to_dict()["sha256"], "ranges": ranges, "bytes": sizes}
            (tmp / SHARD_META_FILE).write_bytes(json.dumps(meta, sort_keys=True, indent=2).encode())
        return info

    def shard_info(self, index: int) -> ShardInfo:
        meta_path = self.directory / _shard_name(index) / SHARD_META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"shard {index} of split {self.split!r} is not written: no {meta_path}")
        meta = json.loads(meta_path.read_text())
        return ShardInfo(_shard_name(index), int(meta["rows"]), dict(meta["sha256"]), dict(meta["ranges"]))

    def read_shard(self, index: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Memory-map a complete shard (optionally only ``fields`` that it has)."""
        info = self.shard_info(index)
        shard = _load_shard(self.directory / info.name, info, self.hidden_dtype)
        return {name: arr for name, arr in shard.items() if fields is None or name in fields}

    def finalize(self, num_shards: int) -> dict[str, Any]:
        """Check shards ``0..num_shards-1``, write ``tokens.parquet``; return ``{"rows", "shards"}``."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards} (write an empty shard instead)")
        missing = [_shard_name(i) for i in range(num_shards) if not self.is_complete(i)]
        if missing:
            raise UserError(
                f"split {self.split!r}: {self.directory / missing[0]} is missing or incomplete "
                f"({len(missing)} of {num_shards} shards); re-run spec-collect to write it"
            )
        infos = [self.shard_info(i) for i in range(num_shards)]
        columns: dict[str, list[np.ndarray]] = {name: [] for name in _TOKEN_COLUMNS}
        reference: dict[str, tuple[int, ...]] | None = None
        for info in infos:
            shard = _load_shard(self.directory / info.name, info, self.hidden_dtype)
            signature = {name: arr.shape[1:] for name, arr in shard.items()}
            if reference is None:
                reference = signature
            elif signature != reference:
                raise UserError(
                    f"{self.directory / info.name} has fields/trailing shapes {signature}, {infos[0].name} "
                    f"has {reference}; delete {self.directory} and {COLLECT_FIX}"
                )
            for name in _TOKEN_COLUMNS:
                columns[name].append(np.asarray(shard[name]))
        rows = sum(info.rows for info in infos)
        columns_N = {name: np.concatenate(parts) for name, parts in columns.items()}
        table = pa.table({"row": np.arange(rows, dtype=np.int64)} | columns_N)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.directory / TOKENS_FILE, sink.getvalue().to_pybytes())
        return {"rows": rows, "shards": [info.to_dict() for info in infos]}


def write_manifest(root: Path | str, manifest: dict[str, Any]) -> Path:
    """Set ``manifest["schema_version"]``, check it against the schema and write ``root/manifest.json``
    atomically (sorted keys)."""
    manifest["schema_version"] = SCHEMA_VERSION
    if problem := manifest_problem(manifest):
        raise ValueError(f"manifest for {root} is invalid: {problem}")
    path = Path(root) / MANIFEST_FILE
    atomic_write_bytes(path, (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
    return path
