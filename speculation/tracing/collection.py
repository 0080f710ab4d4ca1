"""Run sequences through a model under the recorder and write one trace store per token stream.

``traces/`` holds the stream whose routing a decode step needs (the decoder; the only stack of decoder-only
models). An encoder-decoder model's encoder stream goes to ``traces/encoder/``, a store of its own.

The batch plan is a pure function of the documents and the trace config, and every shard holds whole batches,
so a run that resumes after a kill (skipping finished shards) feeds the model exactly the batches an
uninterrupted run would: the files come out identical, capacity dropping (which depends on the batch) included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from speculation.config import TraceConfig
from speculation.corpus import Document
from speculation.health import RouterHealth
from speculation.io import atomic_write_text
from speculation.plots import utilisation_heatmap
from speculation.traces import TRACE_FIELDS, SplitWriter, write_manifest
from speculation.tracing.feeders import Chunk, make_chunks, sample_order
from speculation.tracing.recorder import RoutingRecorder

MANIFEST_FILE = "manifest.json"
IDENTITY_FILE = "identity.json"
ROUTER_WEIGHTS_FILE = "router_weights.safetensors"
PRIMARY_STACK = "decoder"


def stack_dir(traces_dir: Path, stack: str) -> Path:
    return traces_dir if stack == PRIMARY_STACK else traces_dir / stack


@torch.no_grad()
def trace_split(
    model: nn.Module,
    feeder: Any,
    recorders: dict[str, RoutingRecorder],
    writers: dict[str, SplitWriter],
    healths: dict[str, RouterHealth],
    chunks: Sequence[Chunk],
    batch_size: int,
    batches_per_shard: int,
    device: torch.device,
) -> dict[str, dict]:
    """Trace ``chunks`` into shards of every stack (skipping shards already complete in all of them).

    Health is updated from every shard as stored, including ones found on disk, so a resumed run summarises
    exactly what a fresh one does. Returns each stack's manifest entry for this split.
    """
    split = next(iter(writers.values())).split
    if not chunks:
        raise ValueError(f"split {split!r} has no tokens to trace; lower corpus fractions or add documents.")
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
    shards = [batches[i : i + batches_per_shard] for i in range(0, len(batches), batches_per_shard)]
    model.eval()
    progress = tqdm(total=sum(len(c.ids) for c in chunks), desc=f"trace {split}", unit="tok")
    for index, shard_batches in enumerate(shards):
        if not all(writer.is_complete(index) for writer in writers.values()):
            parts: dict[str, list[dict[str, np.ndarray]]] = {stack: [] for stack in writers}
            for batch in shard_batches:
                fed = feeder(model, batch, device)
                for stack, (mask_BT, rows) in fed.items():
                    parts[stack].append(recorders[stack].collect(mask_BT) | rows)
            for stack, writer in writers.items():
                writer.write_shard(
                    index, {name: np.concatenate([p[name] for p in parts[stack]]) for name in parts[stack][0]}
                )
        for stack, writer in writers.items():
            stored = writer.read_shard(index, fields=("experts", "logits", "dropped"))
            healths[stack].update(stored["experts"], stored["logits"], stored.get("dropped"))
        progress.update(sum(len(c.ids) for batch in shard_batches for c in batch))
    progress.close()
    return {stack: writer.finalize(len(shards)) for stack, writer in writers.items()}


def check_trace_identity(traces_dir: Path, identity: dict) -> None:
    """Refuse to resume into a trace dir recorded with another model or trace config (shards would mix)."""
    path = traces_dir / IDENTITY_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != identity:
            changed = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
            raise ValueError(
                f"{traces_dir} holds traces of a different model or trace config (differs in: {', '.join(changed)}). "
                f"Use another workdir, or delete {traces_dir} to re-trace."
            )
    else:
        traces_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def save_router_weights(recorder: RoutingRecorder, path: Path) -> None:
    """Every router's parameters, keyed ``<layer label>.<param>``, for the gate-lookahead baseline."""
    tensors = {
        f"{site.label}.{name}": tensor.contiguous()
        for site in recorder.sites
        for name, tensor in recorder.adapter.router_state(site).items()
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": recorder.adapter.family})
    os.replace(tmp, path)


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def _stack_manifest(recorder: RoutingRecorder, model: nn.Module, traces_dir: Path, stacks: Sequence[str]) -> dict:
    geometry = recorder.adapter.geometry(model)
    hidden_size = geometry["d_model"] if recorder.hidden_sites else 0
    root = stack_dir(traces_dir, recorder.stack)
    return {
        "stack": recorder.stack,
        "other_stacks": {s: os.path.relpath(stack_dir(traces_dir, s), root) for s in stacks if s != recorder.stack},
        "adapter": recorder.adapter.family,
        "geometry": geometry,
        "routing": {
            "num_experts": geometry["num_experts"],
            "max_experts_per_token": geometry["top_k"],
            "layers": recorder.layer_labels,
            **recorder.adapter.routing_meta(model),
        },
        "hidden": {"layers": recorder.hidden_sites, "size": hidden_size, "source": "the router's input"},
        "dtypes": {name: np.dtype(dtype).name for name, dtype in TRACE_FIELDS.items()},
        "router_weights": {"file": ROUTER_WEIGHTS_FILE, "format": recorder.adapter.family},
    }


def collect_traces(
    model: nn.Module,
    feeder: Any,
    split_documents: dict[str, list[Document]],
    split_ids: dict[str, list[np.ndarray]],
    cfg: TraceConfig,
    traces_dir: Path,
    identity: dict,
    manifest_extra: dict,
    device: torch.device,
    salt: str,
) -> dict:
    """Trace every configured split of every stack; write manifests (last), ``summary.json`` and figures.

    Returns the primary stack's summary: router health per split and over all splits.
    """
    check_trace_identity(traces_dir, identity)
    stacks = feeder.stacks
    for stack in stacks:  # until the end, no store may look complete
        (stack_dir(traces_dir, stack) / MANIFEST_FILE).unlink(missing_ok=True)
    hidden_sites = cfg.hidden_layers if cfg.save_hidden else []
    recorders = {stack: RoutingRecorder(model, stack=stack, hidden_sites=hidden_sites) for stack in stacks}
    num_experts = recorders[PRIMARY_STACK].adapter.geometry(model)["num_experts"]
    overall = {stack: RouterHealth(recorders[stack].layer_labels, num_experts) for stack in stacks}
    summaries: dict[str, dict] = {stack: {"splits": {}} for stack in stacks}
    entries: dict[str, dict] = {stack: {} for stack in stacks}
    doc_rows = []
    for recorder in recorders.values():
        recorder.attach()
    try:
        for split in cfg.splits:
            order = sample_order([doc.doc_id for doc in split_documents[split]], salt)
            docs = [split_documents[split][i] for i in order]
            ids = [split_ids[split][i] for i in order]
            chunks = make_chunks(ids, cfg.seq_len, cfg.max_tokens_per_split, min_tokens=feeder.min_tokens)
            healths = {stack: RouterHealth(recorders[stack].layer_labels, num_experts) for stack in stacks}
            writers = {stack: SplitWriter(stack_dir(traces_dir, stack), split) for stack in stacks}
            split_entries = trace_split(
                model, feeder, recorders, writers, healths, chunks, cfg.batch_size, cfg.batches_per_shard, device
            )
            for stack in stacks:
                entries[stack][split] = split_entries[stack]
                overall[stack].merge(healths[stack])
                summaries[stack]["splits"][split] = healths[stack].summary()
            traced = np.bincount([c.doc for c in chunks], weights=[len(c.ids) for c in chunks], minlength=len(docs))
            doc_rows += [
                {"split": split, "doc": i, "doc_id": d.doc_id, "tokens": len(t), "traced_tokens": int(n)}
                for i, (d, t, n) in enumerate(zip(docs, ids, traced, strict=True))
            ]
    finally:
        for recorder in recorders.values():
            recorder.detach()

    pd.DataFrame(doc_rows).to_parquet(traces_dir / "documents.parquet.tmp", index=False)
    os.replace(traces_dir / "documents.parquet.tmp", traces_dir / "documents.parquet")
    for stack in stacks:
        root, recorder = stack_dir(traces_dir, stack), recorders[stack]
        save_router_weights(recorder, root / ROUTER_WEIGHTS_FILE)
        summaries[stack]["overall"] = overall[stack].summary()
        _write_json(root / "summary.json", summaries[stack])
        heatmap = utilisation_heatmap(
            overall[stack].expert_load_matrix(),
            recorder.layer_labels,
            root / "figures" / "expert_utilisation.png",
            title=f"{stack} expert utilisation (uniform = {1 / num_experts:.3f})",
        )
        manifest = {
            **manifest_extra,
            **_stack_manifest(recorder, model, traces_dir, stacks),
            "documents": os.path.relpath(traces_dir / "documents.parquet", root),
            "trace_config": identity["trace"],
            "splits": entries[stack],
            "figures": {"expert_utilisation": str(heatmap.relative_to(root))},
        }
        write_manifest(root, json.loads(json.dumps(manifest, default=str)))  # last: marks a complete store
    return summaries[PRIMARY_STACK]
