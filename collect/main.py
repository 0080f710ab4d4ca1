"""``spec-collect``: train (or reload) the source MoE and record its real routing into ``workdir/traces``.

spec-collect                              # embedded Switch LM on the stdlib corpus
spec-collect experiment=smoke             # tiny, under a minute on 2 cores
spec-collect router=topk workdir=outputs/top2
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from speculation.config import CONF_DIR, CollectConfig, to_object
from speculation.corpus import corpus_fingerprint, load_documents, split_documents
from speculation.models.source import source_identity, train_or_load
from speculation.tokenizer import encode_documents, load_or_train_tokenizer
from speculation.tracing.collection import collect_traces
from speculation.tracking import start_run

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto.")
    return torch.device(name)


def collect(cfg: DictConfig | CollectConfig) -> Path:
    """Run the collect stage; returns the trace directory (``workdir/traces``)."""
    cfg = to_object(cfg, CollectConfig)
    workdir = Path(cfg.workdir)
    source_dir, traces_dir = workdir / "source_model", workdir / "traces"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    documents = load_documents(cfg.corpus)
    splits = split_documents(documents, cfg.corpus)
    for split in ("train", *cfg.trace.splits):
        if not splits[split]:
            raise ValueError(
                f"the corpus split {split!r} is empty ({len(documents)} documents in all). Use more documents "
                "(corpus.max_documents) or larger corpus.val_fraction / corpus.test_fraction."
            )
    fingerprint = corpus_fingerprint(cfg.corpus, documents)
    source_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(
        source_dir / "tokenizer.json",
        splits["train"],
        cfg.model.vocab_size,
        cfg.corpus.tokenizer_min_frequency,
        fingerprint,
    )
    split_ids = {name: encode_documents(tokenizer, docs) for name, docs in splits.items()}

    tracker = start_run(
        cfg.logger,
        workdir,
        job_type="collect",
        name=f"collect-{cfg.model.name}-{cfg.router.gate}-k{cfg.router.max_experts_per_token}",
        config=json.loads(json.dumps(asdict(cfg), default=str)),
        default_group=cfg.experiment_name,
        tags=[cfg.model.name, f"router-{cfg.router.gate}-{cfg.router.selection}"],
    )
    try:
        identity = source_identity(cfg.model, cfg.router, cfg.source_train, fingerprint)
        model, source_metrics = train_or_load(
            source_dir,
            identity,
            cfg.model,
            cfg.router,
            cfg.source_train,
            split_ids["train"],
            split_ids["val"],
            device,
            tracker,
        )
        log.info(
            "source model: val loss %.3f nats/token vs unigram %.3f",
            source_metrics["val_loss"],
            source_metrics["unigram_val_loss"],
        )
        trace_cfg = {k: v for k, v in asdict(cfg.trace).items() if k != "splits"}
        summary = collect_traces(
            model,
            splits,
            split_ids,
            cfg.trace,
            traces_dir,
            identity={"source": identity, "trace": trace_cfg},
            manifest_extra={
                "model": {"kind": str(cfg.model.kind), "name": cfg.model.name, "source_dir": "../source_model"},
                "router": json.loads(json.dumps(asdict(cfg.router), default=str)),
                "tokenizer": "../source_model/tokenizer.json",
                "corpus": {"kind": str(cfg.corpus.kind), "fingerprint": fingerprint, "documents": len(documents)},
                "source_metrics": {k: v for k, v in source_metrics.items() if k != "history"},
            },
            device=device,
            salt=cfg.corpus.split_salt,
        )
        mean = summary["overall"]["mean"]
        tracker.summary({f"health/{k}": v for k, v in mean.items()})
        tracker.log_image("expert_utilisation", traces_dir / "figures" / "expert_utilisation.png")
        log.info("traces written to %s (%d tokens)", traces_dir, summary["overall"]["tokens"])
    finally:
        tracker.finish()
    return traces_dir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="collect")
def main(cfg: DictConfig) -> None:
    collect(cfg)


if __name__ == "__main__":
    main()
