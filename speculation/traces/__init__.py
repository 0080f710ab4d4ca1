"""Routing traces: the sharded store (writer, reader), its typed manifest, and views of it (batches, windows,
a pandas frame)."""

from speculation.traces.batches import TraceBatch, iter_batches, load_batch, router_distribution
from speculation.traces.dataset import SequenceDataset, routing_frame
from speculation.traces.manifest import SCHEMA_VERSION, Manifest, TraceFormatError
from speculation.traces.reader import TraceSplit, TraceStore
from speculation.traces.store import (
    REQUIRED_FIELDS,
    TRACE_FIELDS,
    ShardInfo,
    SplitWriter,
    write_manifest,
)

__all__ = [
    "REQUIRED_FIELDS",
    "SCHEMA_VERSION",
    "TRACE_FIELDS",
    "Manifest",
    "SequenceDataset",
    "ShardInfo",
    "SplitWriter",
    "TraceBatch",
    "TraceFormatError",
    "TraceSplit",
    "TraceStore",
    "iter_batches",
    "load_batch",
    "router_distribution",
    "routing_frame",
    "write_manifest",
]
