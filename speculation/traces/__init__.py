"""Routing trace storage: sharded numpy writer/reader and dataset views."""

from speculation.traces.dataset import SequenceDataset, routing_frame
from speculation.traces.reader import TraceSplit, TraceStore
from speculation.traces.store import (
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    TRACE_FIELDS,
    ShardInfo,
    SplitWriter,
    TraceFormatError,
    write_manifest,
)

__all__ = [
    "REQUIRED_FIELDS",
    "SCHEMA_VERSION",
    "TRACE_FIELDS",
    "SequenceDataset",
    "ShardInfo",
    "SplitWriter",
    "TraceFormatError",
    "TraceSplit",
    "TraceStore",
    "routing_frame",
    "write_manifest",
]
