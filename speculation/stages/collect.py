"""The collect stage: train (or reload) the source MoE and record its real routing into ``Workdir.traces()``."""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from speculation.config import to_object
from speculation.config.model import ModelKind
from speculation.config.stages import CollectConfig
from speculation.corpus import corpus_fingerprint, load_documents, split_documents
from speculation.distributed import Ranks, barrier, main_decides, main_first, process_group
from speculation.errors import MissingInputError, UserError
from speculation.identity import json_sha256
from speculation.io import file_sha256
from speculation.locks import locked
from speculation.models.hf import (
    encode_with_hf_tokenizer,
    hf_identity,
    hf_model_digests,
    input_device,
    load_hf_model,
    pad_token_id,
)
from speculation.models.source import check_beats_unigram, load_source_model, source_identity, train_or_load
from speculation.stages.device import resolve_device
from speculation.stages.job import apply_threads
from speculation.tokenizer import PAD_ID, encode_documents, load_or_train_tokenizer
from speculation.tracing.collection import collect_traces
from speculation.tracing.feeders import CausalFeeder, Seq2SeqFeeder
from speculation.tracking import Tracker, start_run
from speculation.workdir import CONFIG_FILE, FIGURES_DIR, METRICS_FILE, WEIGHTS_FILE, Workdir

log = logging.getLogger(__name__)


@dataclass
class Source:
    """The model to trace and everything the trace store needs to say about it."""

    model: torch.nn.Module
    split_ids: dict[str, list[np.ndarray]]  # token ids per document, per split
    feeder: CausalFeeder | Seq2SeqFeeder
    identity: dict  # what the traces were recorded from
    manifest: dict  # model / tokenizer / source-metrics entries of the manifest
    device: torch.device | None = None  # where its inputs go, if not the run's device (a device-mapped model)


def embedded_source(
    cfg: CollectConfig, splits: dict, fingerprint: str, workdir: Workdir, device: torch.device, tracker: Tracker
) -> Source:
    """Train (or reload) the embedded Switch LM on the corpus' train split."""
    workdir.source_model.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(
        workdir.tokenizer, splits["train"], cfg.model.vocab_size, cfg.corpus.tokenizer_min_frequency, fingerprint
    )
    split_ids = {name: encode_documents(tokenizer, docs) for name, docs in splits.items()}
    identity = source_identity(cfg.model, cfg.router, cfg.source_train, fingerprint)
    model, metrics = train_or_load(
        workdir.source_model,
        identity,
        cfg.model,
        cfg.router,
        cfg.source_train,
        split_ids["train"],
        split_ids["val"],
        device,
        tracker,
    )
    log.info("source model: val loss %.3f nats/token vs unigram %.3f", metrics["val_loss"], metrics["unigram_val_loss"])
    check_beats_unigram(metrics, workdir.source_model, cfg.source_train)
    traces = workdir.traces()
    return Source(
        model=model,
        split_ids=split_ids,
        feeder=CausalFeeder(pad_id=PAD_ID, hf_style=False),
        identity=identity,
        manifest={
            "model": {
                "kind": "embedded",
                "name": cfg.model.display_name,
                "source_dir": os.path.relpath(workdir.source_model, traces),
                # What determines the routing, not the corpus it was trained on (the traces' fingerprint).
                "weights_sha256": file_sha256(workdir.source_model / WEIGHTS_FILE),
                "tokenizer_sha256": file_sha256(workdir.tokenizer),
                "config_sha256": json_sha256({"model": identity["model"], "router": identity["router"]}),
            },
            "tokenizer": os.path.relpath(workdir.tokenizer, traces),
            "source_metrics": {k: v for k, v in metrics.items() if k != "history"},
        },
    )


def check_source_workdir(cfg: CollectConfig, workdir: Workdir) -> Workdir:
    """``model.source_workdir``, checked before any work: it holds a trained model and is not this workdir."""
    source = Workdir(cfg.model.source_workdir)
    weights, tokenizer_path = source.source_model / WEIGHTS_FILE, source.tokenizer
    if source.root.resolve() == workdir.root.resolve():
        raise UserError(f"model.source_workdir={cfg.model.source_workdir} is this workdir; leave it unset.")
    if not weights.is_file() or not tokenizer_path.is_file():
        raise MissingInputError(
            f"model.source_workdir={cfg.model.source_workdir} holds no trained source model ({weights} and "
            f"{tokenizer_path}); run spec-collect workdir={cfg.model.source_workdir} first."
        )
    return source


def source_from_workdir(cfg: CollectConfig, source: Workdir, fingerprint: str, splits: dict, device) -> Source:
    """The embedded model and tokenizer trained in ``source`` (``model.source_workdir``, as
    :func:`check_source_workdir` returned it), to trace on this workdir's corpus.

    Its traces carry the same model identity (weights, tokenizer and config digests), so predictors trained on the
    source workdir's traces score on these ones: the corpus is not part of the model's identity.
    """
    weights, tokenizer_path = source.source_model / WEIGHTS_FILE, source.tokenizer
    saved = json.loads((source.source_model / CONFIG_FILE).read_text())
    metrics = json.loads((source.source_model / METRICS_FILE).read_text())
    log.info("tracing the source model of %s (trained on corpus %s) on this corpus", source.root, saved["data"])
    weights_sha, tokenizer_sha = file_sha256(weights), file_sha256(tokenizer_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return Source(
        model=load_source_model(source.source_model, device),
        split_ids={name: encode_documents(tokenizer, docs) for name, docs in splits.items()},
        feeder=CausalFeeder(pad_id=PAD_ID, hf_style=False),
        identity={"weights_sha256": weights_sha, "tokenizer_sha256": tokenizer_sha, "data": fingerprint},
        manifest={
            "model": {
                "kind": "embedded",
                "name": saved["model"]["name"] or cfg.model.display_name,
                "source_dir": str(source.source_model.resolve()),
                "weights_sha256": weights_sha,
                "tokenizer_sha256": tokenizer_sha,
                "config_sha256": json_sha256({"model": saved["model"], "router": saved["router"]}),
                "trained_on_corpus": saved["data"],
            },
            "tokenizer": str(tokenizer_path.resolve()),
            "source_metrics": {k: v for k, v in metrics.items() if k != "history"},
        },
    )


def hf_source(cfg: CollectConfig, splits: dict, fingerprint: str, device: torch.device) -> Source:
    """Load a HuggingFace checkpoint; its own tokenizer encodes the corpus."""
    model, tokenizer = load_hf_model(cfg.model, device)
    pad = pad_token_id(tokenizer, model)
    if model.config.is_encoder_decoder:
        start = model.config.decoder_start_token_id
        feeder = Seq2SeqFeeder(pad, pad if start is None else int(start), cfg.model.encoder_fraction)
    else:
        feeder = CausalFeeder(pad_id=pad, hf_style=True)
    return Source(
        model=model,
        split_ids={name: encode_with_hf_tokenizer(tokenizer, docs) for name, docs in splits.items()},
        feeder=feeder,
        identity={"hf": hf_identity(cfg.model, model), "data": fingerprint},
        manifest={
            "model": {
                "kind": "hf",
                "name": cfg.model.display_name,
                "path": str(cfg.model.path),
                **hf_model_digests(cfg.model, model),
            },
            "tokenizer": str(cfg.model.path),
            "source_metrics": None,
        },
        device=input_device(model, device),
    )


def collect(cfg: DictConfig | CollectConfig) -> Path:
    """Run the collect stage; returns the trace directory (``Workdir.traces()``)."""
    cfg = to_object(cfg, CollectConfig)
    workdir = Workdir(cfg.workdir)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    with process_group(device) as ranks:
        # Rank 0 holds the traces for the whole launch; the other ranks are part of its job, not rivals for the lock.
        lock = locked(workdir.lock("traces"), f"the traces of {workdir.root}") if ranks.is_main else nullcontext()
        with lock:
            barrier()  # no rank starts before rank 0 holds the lock
            traces = _collect(cfg, workdir, device, ranks)
            barrier()  # rank 0 keeps the lock until every rank is done
    return traces


def _collect(cfg: CollectConfig, workdir: Workdir, device: torch.device, ranks: Ranks) -> Path:
    trained_elsewhere = check_source_workdir(cfg, workdir) if cfg.model.source_workdir is not None else None
    documents = load_documents(cfg.corpus)
    splits = split_documents(documents, cfg.corpus)
    for split in dict.fromkeys(["train", *cfg.trace.splits]):  # ordered, without repeats
        if not splits[split]:
            raise UserError(
                f"the corpus split {split!r} is empty ({len(documents)} documents in all). Use more documents "
                "(corpus.max_documents) or larger corpus.val_fraction / corpus.test_fraction."
            )
    fingerprint = corpus_fingerprint(cfg.corpus, documents)
    router_tag = f"router-{cfg.router.label}" if cfg.model.kind == ModelKind.embedded else "hf"
    tracker = start_run(
        cfg, job_type="collect", name=f"collect-{cfg.model.display_name}", tags=[cfg.model.display_name, router_tag]
    )
    try:
        # Rank 0 trains the embedded tokenizer and model, which the others then load; a trained one, a checkpoint or
        # a model of another workdir is only read, so every rank loads it at once (rank 0 decides which, so no rank
        # sees the weights appear halfway).
        trains = (
            cfg.model.kind == ModelKind.embedded
            and trained_elsewhere is None
            and not main_decides(lambda: (workdir.source_model / WEIGHTS_FILE).is_file())
        )
        with main_first(ranks) if trains else nullcontext():
            if trained_elsewhere is not None:
                source = source_from_workdir(cfg, trained_elsewhere, fingerprint, splits, device)
            elif cfg.model.kind == ModelKind.embedded:
                source = embedded_source(cfg, splits, fingerprint, workdir, device, tracker)
            else:
                source = hf_source(cfg, splits, fingerprint, device)
        trace_cfg = cfg.trace.identity()
        summary = collect_traces(
            source.model,
            source.feeder,
            splits,
            source.split_ids,
            cfg.trace,
            workdir,
            identity={"source": source.identity, "trace": trace_cfg},
            manifest_extra={
                **source.manifest,
                "corpus": {"kind": str(cfg.corpus.kind), "fingerprint": fingerprint, "documents": len(documents)},
            },
            device=source.device or device,
            salt=cfg.corpus.split_salt,
            ranks=ranks,
        )
        tracker.summary({f"health/{k}": v for k, v in summary["overall"]["mean"].items()})
        tracker.log_image("expert_utilisation", workdir.traces() / FIGURES_DIR / "expert_utilisation.png")
        log.info("traces written to %s (%d tokens)", workdir.traces(), summary["overall"]["tokens"])
    finally:
        tracker.finish()
    return workdir.traces()
