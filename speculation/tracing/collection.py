"""Cut documents into sequences, run them through a model under the recorder, and write trace shards.

The batch plan is a pure function of the documents and the trace config, and every shard holds whole batches,
so a run that resumes after a kill (skipping finished shards) feeds the model exactly the batches an
uninterrupted run would: the files come out identical, capacity dropping (which depends on the batch) included.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from speculation.config import TraceConfig
from speculation.corpus import Document
from speculation.health import RouterHealth
from speculation.plots import utilisation_heatmap
from speculation.tokenizer import PAD_ID
from speculation.traces import TRACE_FIELDS, SplitWriter, write_manifest
from speculation.tracing.recorder import RoutingRecorder

MANIFEST_FILE = "manifest.json"
IDENTITY_FILE = "identity.json"
ROUTER_WEIGHTS_FILE = "router_weights.safetensors"


@dataclass(frozen=True)
class Chunk:
    """One traced sequence: ``ids`` are tokens ``start .. start + len(ids)`` of document ``doc``."""

    seq: int
    doc: int
    start: int
    ids: np.ndarray


def sample_order(doc_ids: Sequence[str], salt: str) -> list[int]:
    """A hash-random but fixed order of documents, so a token budget takes an unbiased sample of them."""
    return sorted(range(len(doc_ids)), key=lambda i: hashlib.sha256(f"{salt}:order:{doc_ids[i]}".encode()).digest())


def make_chunks(documents: Sequence[np.ndarray], seq_len: int, max_tokens: int | None = None) -> list[Chunk]:
    """Cut each document (in the given order) into pieces of at most ``seq_len`` tokens.

    With ``max_tokens``, stops after the first chunk that reaches the budget.
    """
    chunks: list[Chunk] = []
    total = 0
    for doc, ids in enumerate(documents):
        for start in range(0, len(ids), seq_len):
            piece = np.asarray(ids[start : start + seq_len], dtype=np.int64)
            chunks.append(Chunk(seq=len(chunks), doc=doc, start=start, ids=piece))
            total += len(piece)
            if max_tokens is not None and total >= max_tokens:
                return chunks
    return chunks


def pad_batch(chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, T) and the bool mask of real tokens."""
    width = max(len(chunk.ids) for chunk in chunks)
    tokens = torch.full((len(chunks), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.bool)
    for row, chunk in enumerate(chunks):
        tokens[row, : len(chunk.ids)] = torch.from_numpy(chunk.ids)
        mask[row, : len(chunk.ids)] = True
    return tokens, mask


def chunk_metadata(chunks: Sequence[Chunk]) -> dict[str, np.ndarray]:
    """Per-token ``token, doc, pos, seq`` in the same (sequence, position) order as the recorder's rows."""
    return {
        "token": np.concatenate([chunk.ids for chunk in chunks]).astype(np.int32),
        "doc": np.concatenate([np.full(len(c.ids), c.doc) for c in chunks]).astype(np.int32),
        "pos": np.concatenate([np.arange(c.start, c.start + len(c.ids)) for c in chunks]).astype(np.int32),
        "seq": np.concatenate([np.full(len(c.ids), c.seq) for c in chunks]).astype(np.int32),
    }


@torch.no_grad()
def trace_split(
    model: nn.Module,
    recorder: RoutingRecorder,
    chunks: Sequence[Chunk],
    writer: SplitWriter,
    batch_size: int,
    batches_per_shard: int,
    device: torch.device,
    health: RouterHealth,
    forward_kwargs: dict | None = None,
) -> dict:
    """Trace ``chunks`` into shards (skipping shards that already exist) and return the split's manifest entry.

    ``health`` is updated from every shard, including ones found on disk, so the summary covers the whole split.
    """
    if not chunks:
        raise ValueError(f"split {writer.split!r} has no tokens to trace; lower corpus fractions or add documents.")
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
    shards = [batches[i : i + batches_per_shard] for i in range(0, len(batches), batches_per_shard)]
    model.eval()
    progress = tqdm(total=sum(len(c.ids) for c in chunks), desc=f"trace {writer.split}", unit="tok")
    for index, shard_batches in enumerate(shards):
        shard_tokens = sum(len(c.ids) for batch in shard_batches for c in batch)
        if not writer.is_complete(index):
            parts = []
            for batch in shard_batches:
                tokens_BT, mask_BT = pad_batch(batch)
                model(tokens_BT.to(device), mask_BT.to(device), **(forward_kwargs or {}))
                parts.append(recorder.collect(mask_BT))
            arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            arrays.update(chunk_metadata([c for batch in shard_batches for c in batch]))
            writer.write_shard(index, arrays)
        # Health reads the stored (float16) values back, so a resumed run summarises exactly what a fresh one does.
        arrays = writer.read_shard(index, fields=("experts", "logits", "dropped"))
        health.update(arrays["experts"], arrays["logits"], arrays.get("dropped"))
        progress.update(shard_tokens)
    progress.close()
    return writer.finalize(len(shards))


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
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
        os.replace(tmp, path)


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


def collect_traces(
    model: nn.Module,
    split_documents: dict[str, list[Document]],
    split_ids: dict[str, list[np.ndarray]],
    cfg: TraceConfig,
    traces_dir: Path,
    identity: dict,
    manifest_extra: dict,
    device: torch.device,
    salt: str,
) -> dict:
    """Trace every configured split into ``traces_dir`` and write the manifest (last) and ``summary.json``.

    Returns the summary: router health per split and over all splits.
    """
    check_trace_identity(traces_dir, identity)
    (traces_dir / MANIFEST_FILE).unlink(missing_ok=True)  # until the end, the store must not look complete
    recorder = RoutingRecorder(model, hidden_sites=(cfg.hidden_layers if cfg.save_hidden else []))
    overall = RouterHealth(recorder.layer_labels, recorder.adapter.geometry(model)["num_experts"])
    summary: dict = {"splits": {}}
    entries, doc_rows = {}, []
    with recorder:
        for split in cfg.splits:
            order = sample_order([doc.doc_id for doc in split_documents[split]], salt)
            docs = [split_documents[split][i] for i in order]
            ids = [split_ids[split][i] for i in order]
            chunks = make_chunks(ids, cfg.seq_len, cfg.max_tokens_per_split)
            health = RouterHealth(recorder.layer_labels, overall.num_experts)
            entries[split] = trace_split(
                model,
                recorder,
                chunks,
                SplitWriter(traces_dir, split),
                cfg.batch_size,
                cfg.batches_per_shard,
                device,
                health,
            )
            overall.merge(health)
            summary["splits"][split] = health.summary()
            traced = np.bincount([c.doc for c in chunks], weights=[len(c.ids) for c in chunks], minlength=len(docs))
            doc_rows += [
                {"split": split, "doc": i, "doc_id": d.doc_id, "tokens": len(t), "traced_tokens": int(n)}
                for i, (d, t, n) in enumerate(zip(docs, ids, traced, strict=True))
            ]
        save_router_weights(recorder, traces_dir / ROUTER_WEIGHTS_FILE)

    pd.DataFrame(doc_rows).to_parquet(traces_dir / "documents.parquet.tmp", index=False)
    os.replace(traces_dir / "documents.parquet.tmp", traces_dir / "documents.parquet")
    summary["overall"] = overall.summary()
    heatmap = utilisation_heatmap(
        overall.expert_load_matrix(), recorder.layer_labels, traces_dir / "figures" / "expert_utilisation.png"
    )
    summary_path = traces_dir / "summary.json"
    summary_path.with_suffix(".tmp").write_text(json.dumps(summary, indent=2))
    os.replace(summary_path.with_suffix(".tmp"), summary_path)

    geometry = recorder.adapter.geometry(model)
    hidden_sites = recorder.hidden_sites
    manifest = {
        **manifest_extra,
        "adapter": recorder.adapter.family,
        "geometry": geometry,
        "routing": {
            "num_experts": geometry["num_experts"],
            "max_experts_per_token": geometry["top_k"],
            "layers": recorder.layer_labels,
        },
        "hidden": {
            "layers": hidden_sites,
            "size": geometry["d_model"] if hidden_sites else 0,
            "source": "router input (the normed hidden state the router scores)",
        },
        "dtypes": {name: np.dtype(dtype).name for name, dtype in TRACE_FIELDS.items()},
        "router_weights": {"file": ROUTER_WEIGHTS_FILE, "format": recorder.adapter.family},
        "trace_config": identity["trace"],
        "splits": entries,
        "figures": {"expert_utilisation": str(heatmap.relative_to(traces_dir))},
    }
    write_manifest(traces_dir, manifest)  # last: its presence marks a complete store
    return summary
