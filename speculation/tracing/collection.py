"""Run sequences through a model under the recorder and write one trace store per token stream.

``Workdir.traces()`` holds the stream whose routing a decode step needs (the decoder; the only stack of
decoder-only models). An encoder-decoder model's encoder stream goes to ``Workdir.traces("encoder")``, a store of
its own.

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

from speculation.config.collect import TraceConfig
from speculation.corpus import Document
from speculation.distributed import SINGLE_PROCESS, Ranks, barrier, broadcast_object
from speculation.errors import UserError
from speculation.health import RouterHealth
from speculation.identity import claim_identity
from speculation.io import atomic_path, atomic_write_json, remove_stale_temps
from speculation.plots import save_figure, utilisation_heatmap
from speculation.traces import SplitWriter, write_manifest
from speculation.traces.store import LOOKAHEAD_FILL, manifest_dtypes
from speculation.tracing.feeders import Chunk, make_chunks, sample_order
from speculation.tracing.recorder import RoutingRecorder
from speculation.workdir import (
    DOCUMENTS_FILE,
    FIGURES_DIR,
    IDENTITY_FILE,
    MANIFEST_FILE,
    PRIMARY_STACK,
    PROJECTION_FILE,
    ROUTER_WEIGHTS_FILE,
    SUMMARY_FILE,
    Workdir,
)


def plan_shards(chunks: Sequence[Chunk], batch_size: int, batches_per_shard: int) -> list[list[list[Chunk]]]:
    """The split's shards, each a list of whole batches: a pure function of the chunks and the trace config."""
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
    return [batches[i : i + batches_per_shard] for i in range(0, len(batches), batches_per_shard)]


@torch.no_grad()
def write_shards(
    model: nn.Module,
    feeder: Any,
    recorders: dict[str, RoutingRecorder],
    writers: dict[str, SplitWriter],
    shards: Sequence[Sequence[Sequence[Chunk]]],
    device: torch.device,
    ranks: Ranks = SINGLE_PROCESS,
) -> None:
    """Trace this rank's shards (``ranks.owns(index)``) into every stack, skipping those complete in all of them."""
    split = next(iter(writers.values())).split
    if not shards:
        raise UserError(f"split {split!r} has no tokens to trace; lower corpus fractions or add documents.")
    model.eval()
    mine = [index for index in range(len(shards)) if ranks.owns(index)]
    total = sum(len(c.ids) for index in mine for batch in shards[index] for c in batch)
    progress = tqdm(total=total, desc=f"trace {split}", unit="tok", disable=not ranks.is_main or None)
    for index in mine:
        if not all(writer.is_complete(index) for writer in writers.values()):
            parts: dict[str, list[dict[str, np.ndarray]]] = {stack: [] for stack in writers}
            for batch in shards[index]:
                fed = feeder(model, batch, device)
                for stack, (mask_BT, rows) in fed.items():
                    parts[stack].append(recorders[stack].collect(mask_BT) | rows)
            for stack, writer in writers.items():
                writer.write_shard(
                    index, {name: np.concatenate([p[name] for p in parts[stack]]) for name in parts[stack][0]}
                )
        progress.update(sum(len(c.ids) for batch in shards[index] for c in batch))
    progress.close()


def summarize_split(writers: dict[str, SplitWriter], healths: dict[str, RouterHealth], num_shards: int) -> dict:
    """Router health from every shard as stored (whichever rank or run wrote it, so a resumed or multi-rank run
    summarises exactly what a fresh single-process one does); returns each stack's manifest entry for the split."""
    for index in range(num_shards):
        for stack, writer in writers.items():
            if not writer.is_complete(index):
                continue  # finalize names it
            stored = writer.read_shard(index, fields=("experts", "logits", "dropped"))
            healths[stack].update(stored["experts"], stored["logits"], stored.get("dropped"))
    return {stack: writer.finalize(num_shards) for stack, writer in writers.items()}


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
    """Trace ``chunks`` into shards of every stack in this process, then summarise them (:func:`summarize_split`)."""
    shards = plan_shards(chunks, batch_size, batches_per_shard)
    write_shards(model, feeder, recorders, writers, shards, device)
    return summarize_split(writers, healths, len(shards))


def save_router_weights(recorder: RoutingRecorder, path: Path) -> None:
    """Every router's parameters, keyed ``<layer label>.<param>``, for the gate-lookahead baseline."""
    tensors = {
        f"{site.label}.{name}": tensor.contiguous()
        for site in recorder.sites
        for name, tensor in recorder.adapter.router_state(site).items()
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": recorder.adapter.family})


def _recorder_options(cfg: TraceConfig) -> dict[str, Any]:
    """What ``trace`` asks the recorder to keep (the hidden layers and the compact options)."""
    projection = None if cfg.hidden_projection is None else (cfg.hidden_projection, cfg.projection_seed)
    return {
        "hidden_sites": cfg.hidden_layers if cfg.save_hidden else [],
        "hidden_dtype": cfg.hidden_dtype,
        "lookahead": cfg.gate_lookahead or 0,
        "projection": projection,
    }


def _compact_entries(recorder: RoutingRecorder, geometry: dict) -> dict:
    """The manifest's ``hidden`` entry, and ``lookahead`` when it was stored (compact entries only when set)."""
    hidden: dict[str, Any] = {"layers": recorder.hidden_sites, "size": 0, "source": "the router's input"}
    if recorder.hidden_sites:
        hidden["size"] = geometry["d_model"] if recorder.projection is None else recorder.projection[0]
    if recorder.projection is not None and recorder.hidden_sites:
        width, seed = recorder.projection
        hidden["projection"] = {"width": width, "input_size": geometry["d_model"], "seed": seed,
                                "file": PROJECTION_FILE}  # fmt: skip
    entries = {"hidden": hidden}
    if recorder.lookahead:
        entries["lookahead"] = {
            "depth": recorder.lookahead,
            "fill": LOOKAHEAD_FILL,
            "field": "lookahead_logits",
            "source": f"router l+d on the router input of l, rounded to {recorder.hidden_dtype}",
        }
    return entries


def _stack_manifest(recorder: RoutingRecorder, model: nn.Module, workdir: Workdir, stacks: Sequence[str]) -> dict:
    geometry = recorder.adapter.geometry(model)
    root = workdir.traces(recorder.stack)
    return {
        "stack": recorder.stack,
        "other_stacks": {s: os.path.relpath(workdir.traces(s), root) for s in stacks if s != recorder.stack},
        "adapter": recorder.adapter.family,
        "geometry": geometry,
        "routing": {
            "num_experts": geometry["num_experts"],
            "max_experts_per_token": geometry["top_k"],
            "layers": recorder.layer_labels,
            **recorder.adapter.routing_meta(model),
        },
        **_compact_entries(recorder, geometry),
        "dtypes": manifest_dtypes(recorder.hidden_dtype, lookahead=bool(recorder.lookahead)),
        "router_weights": {"file": ROUTER_WEIGHTS_FILE, "format": recorder.adapter.family},
    }


def _write_store(
    workdir: Workdir,
    recorder: RoutingRecorder,
    model: nn.Module,
    stacks: Sequence[str],
    health: RouterHealth,
    summary: dict,
    splits: dict,
    extra: dict,
) -> None:
    """One stack's router weights, summary, utilisation figure and (last, marking it complete) manifest."""
    root = workdir.traces(recorder.stack)
    save_router_weights(recorder, root / ROUTER_WEIGHTS_FILE)
    if recorder.projection_HP is not None:
        with atomic_path(root / PROJECTION_FILE) as tmp:
            save_file({"projection": recorder.projection_HP.contiguous()}, tmp)
    atomic_write_json(root / SUMMARY_FILE, summary, sort_keys=True, default=str)
    title = f"{recorder.stack} expert utilisation (uniform = {1 / health.num_experts:.3f})"
    heatmap = save_figure(
        utilisation_heatmap(health.expert_load_matrix(), recorder.layer_labels, title=title),
        root / FIGURES_DIR / "expert_utilisation.png",
    )
    manifest = {
        **extra,
        **_stack_manifest(recorder, model, workdir, stacks),
        "documents": os.path.relpath(workdir.traces() / DOCUMENTS_FILE, root),
        "splits": splits,
        "figures": {"expert_utilisation": str(heatmap.relative_to(root))},
    }
    write_manifest(root, json.loads(json.dumps(manifest, default=str)))


def collect_traces(
    model: nn.Module,
    feeder: Any,
    split_documents: dict[str, list[Document]],
    split_ids: dict[str, list[np.ndarray]],
    cfg: TraceConfig,
    workdir: Workdir,
    identity: dict,
    manifest_extra: dict,
    device: torch.device,
    salt: str,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict:
    """Trace every configured split of every stack; write manifests (last), ``summary.json`` and figures.

    Under torchrun every rank calls this: each writes its own shards of every split (shard ``i`` is rank
    ``i % world``'s), and rank 0, once all are written, summarises them and writes what the ranks share. Returns
    the primary stack's summary (on every rank): router health per split and over all splits.
    """
    traces_dir = workdir.traces()
    stacks = feeder.stacks
    plans = {}  # split -> (documents, token ids, chunks), in the order the split is traced
    for split in cfg.splits:
        order = sample_order([doc.doc_id for doc in split_documents[split]], salt)
        ids = [split_ids[split][i] for i in order]
        chunks = make_chunks(ids, cfg.seq_len, cfg.max_tokens_per_split, min_tokens=feeder.min_tokens)
        plans[split] = ([split_documents[split][i] for i in order], ids, chunks)
    if ranks.is_main:
        traces_dir.mkdir(parents=True, exist_ok=True)
        claim_identity(
            traces_dir / IDENTITY_FILE,
            identity,
            holds="traces of a different model or trace config",
            fix=f"Use another workdir, or delete {traces_dir} to re-trace.",
        )
        for stack in stacks:  # until the end, no store may look complete
            (workdir.traces(stack) / MANIFEST_FILE).unlink(missing_ok=True)
            for split in cfg.splits:  # a killed writer's leftovers go before any rank writes again
                remove_stale_temps(workdir.traces(stack) / split)
    barrier()
    recorders = {stack: RoutingRecorder(model, stack=stack, **_recorder_options(cfg)) for stack in stacks}
    writers = {  # no cleaning here: another rank may be writing a shard already
        split: {
            stack: SplitWriter(workdir.traces(stack), split, cfg.hidden_dtype, remove_temps=False) for stack in stacks
        }
        for split in cfg.splits
    }
    shards = {
        split: plan_shards(chunks, cfg.batch_size, cfg.batches_per_shard) for split, (_, _, chunks) in plans.items()
    }
    for recorder in recorders.values():
        recorder.attach()
    try:
        for split in cfg.splits:
            write_shards(model, feeder, recorders, writers[split], shards[split], device, ranks)
    finally:
        for recorder in recorders.values():
            recorder.detach()
    barrier()  # every shard of every split is on disk
    summary = None
    if ranks.is_main:
        summary = _write_stores(workdir, recorders, model, plans, writers, shards, identity, manifest_extra)
    return broadcast_object(summary)


def _write_stores(
    workdir: Workdir,
    recorders: dict[str, RoutingRecorder],
    model: nn.Module,
    plans: dict[str, tuple],
    writers: dict[str, dict[str, SplitWriter]],
    shards: dict[str, list],
    identity: dict,
    manifest_extra: dict,
) -> dict:
    """Summarise every split from its stored shards; write the document table and each stack's store (manifest
    last). Returns the primary stack's summary."""
    stacks = list(recorders)
    num_experts = recorders[PRIMARY_STACK].adapter.geometry(model)["num_experts"]
    overall = {stack: RouterHealth(recorders[stack].layer_labels, num_experts) for stack in stacks}
    summaries: dict[str, dict] = {stack: {"splits": {}} for stack in stacks}
    entries: dict[str, dict] = {stack: {} for stack in stacks}
    doc_rows = []
    for split, (docs, ids, chunks) in plans.items():
        healths = {stack: RouterHealth(recorders[stack].layer_labels, num_experts) for stack in stacks}
        split_entries = summarize_split(writers[split], healths, len(shards[split]))
        for stack in stacks:
            entries[stack][split] = split_entries[stack]
            overall[stack].merge(healths[stack])
            summaries[stack]["splits"][split] = healths[stack].summary()
        traced = np.bincount([c.doc for c in chunks], weights=[len(c.ids) for c in chunks], minlength=len(docs))
        doc_rows += [
            {"split": split, "doc": i, "doc_id": d.doc_id, "tokens": len(t), "traced_tokens": int(n)}
            for i, (d, t, n) in enumerate(zip(docs, ids, traced, strict=True))
        ]
    with atomic_path(workdir.traces() / DOCUMENTS_FILE) as tmp:
        pd.DataFrame(doc_rows).to_parquet(tmp, index=False)
    extra = {**manifest_extra, "trace_config": identity["trace"]}
    for stack in stacks:
        summaries[stack]["overall"] = overall[stack].summary()
        _write_store(workdir, recorders[stack], model, stacks, overall[stack], summaries[stack], entries[stack], extra)
    return summaries[PRIMARY_STACK]
