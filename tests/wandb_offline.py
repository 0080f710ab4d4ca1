"""Read an offline W&B run back from its ``run-<id>.wandb`` file, as ``wandb sync`` would upload it.

The file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of checksummed chunks) of
``wandb_internal_pb2.Record`` protobufs. wandb >= 0.2x dropped its Python reader (the Go core writes the file), so
the tests read it here; the records are wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a W&B offline run file"
    records, pending, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0:
            continue
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{pos}: a chunk fails its checksum"  # of type + data
        pending += payload
        if kind in (FULL, LAST):
            records.append(pending)
            pending = b""
    return records


def read_offline_run(run_dir: Path) -> OfflineRun:
    """The run's id, tags, config and final summary from ``run_dir`` (an ``offline-run-<time>-<id>`` directory)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    run = OfflineRun()
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.tags = record.run.run_id, list(record.run.tags)
            run.config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            run.config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run
