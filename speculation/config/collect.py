"""Schemas of what ``spec-collect`` reads and records: ``conf/corpus/``, ``conf/source_train/``, ``conf/trace/``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from speculation.config.checks import check_seed, positive, require


class CorpusKind(StrEnum):
    stdlib = "stdlib"  # the running interpreter's standard library sources
    text_files = "text_files"  # a glob of the user's files
    hf_dataset = "hf_dataset"  # datasets.load_dataset


@dataclass
class CorpusConfig:
    """Where documents come from and how they are split (by document, from a hash of its id)."""

    kind: CorpusKind = CorpusKind.stdlib
    glob: str | None = None  # kind=text_files: e.g. "~/papers/**/*.txt"
    dataset: str | None = None  # kind=hf_dataset: name or local path for datasets.load_dataset
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None  # keep only the first N documents (sorted by id); None keeps all
    max_document_chars: int | None = None  # truncate long documents
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_salt: str = "moe-speculation"  # changing it reshuffles the splits
    tokenizer_min_frequency: int = 2

    def __post_init__(self) -> None:
        require(
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
            f"corpus.val_fraction={self.val_fraction} and corpus.test_fraction={self.test_fraction} must be in "
            "[0, 1) and sum to less than 1.",
        )
        if self.max_documents is not None:
            positive("corpus.max_documents", self.max_documents, "Use null to keep all documents.")
        if self.max_document_chars is not None:
            positive("corpus.max_document_chars", self.max_document_chars, "Use null to keep whole documents.")
        positive("corpus.tokenizer_min_frequency", self.tokenizer_min_frequency)
        if self.kind == CorpusKind.text_files:
            require(bool(self.glob), "corpus=text_files needs corpus.glob, e.g. corpus.glob='docs/**/*.md'.")
        if self.kind == CorpusKind.hf_dataset:
            require(bool(self.dataset), "corpus=hf_dataset needs corpus.dataset, e.g. corpus.dataset=wikitext.")


@dataclass
class SourceTrainConfig:
    """Training of the embedded source model (skipped when a matching checkpoint exists)."""

    steps: int = 1200
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    # A model no better than token frequencies learned nothing to route by: refuse to trace it (a quality gate,
    # not part of the model's identity).
    require_beats_unigram: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "lr", "eval_every", "eval_batches", "checkpoint_every"):
            positive(f"source_train.{name}", getattr(self, name))
        require(self.warmup_steps >= 0, f"source_train.warmup_steps={self.warmup_steps} must be >= 0.")
        require(0 <= self.min_lr_ratio <= 1, f"source_train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        require(self.grad_clip > 0 or math.isinf(self.grad_clip), "source_train.grad_clip must be > 0.")
        require(self.weight_decay >= 0, f"source_train.weight_decay={self.weight_decay} must be >= 0.")
        check_seed("source_train.seed", self.seed)


@dataclass
class TraceConfig:
    """What the recorder captures and how the trace store is sharded."""

    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    seq_len: int = 128  # tokens per traced sequence (documents are cut into chunks of this length)
    batch_size: int = 32
    batches_per_shard: int = 16  # shards are aligned to batches so a resumed run sees identical batches
    save_hidden: bool = True
    hidden_layers: list[int] | None = None  # MoE-layer indices whose router input is saved; None = all
    max_tokens_per_split: int | None = None  # stop each split after about this many tokens; None = all
    # Compact traces (docs/architecture.md, "Trace options"): the defaults keep the full float16 hidden states.
    hidden_dtype: str = "float16"  # HIDDEN_DTYPES: how the saved hidden states are stored
    gate_lookahead: int | None = None  # D: store routers l+1..l+D applied to the hidden state entering l
    hidden_projection: int | None = None  # P: store a fixed random projection of the hidden state to width P
    projection_seed: int = 0  # draws the projection matrix (saved next to the router weights)

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "batches_per_shard"):
            positive(f"trace.{name}", getattr(self, name))
        unknown = sorted(set(self.splits) - {"train", "val", "test"})
        require(not unknown, f"trace.splits has unknown split(s) {unknown}; use train, val and/or test.")
        if self.max_tokens_per_split is not None:
            positive("trace.max_tokens_per_split", self.max_tokens_per_split, "Use null for whole splits.")
        require(
            self.hidden_dtype in HIDDEN_DTYPES,
            f"trace.hidden_dtype={self.hidden_dtype!r} is not one of {', '.join(HIDDEN_DTYPES)}.",
        )
        if self.gate_lookahead is not None:
            positive("trace.gate_lookahead", self.gate_lookahead, "Use null to store no lookahead logits.")
        if self.hidden_projection is not None:
            positive("trace.hidden_projection", self.hidden_projection, "Use null to store the hidden state as is.")
            require(
                self.save_hidden,
                f"trace.hidden_projection={self.hidden_projection} projects the saved hidden states, but "
                "trace.save_hidden=false saves none; set trace.hidden_projection=null or trace.save_hidden=true.",
            )
        check_seed("trace.projection_seed", self.projection_seed)

    def identity(self) -> dict:
        """What the traces' identity records of this config: every key but ``splits`` (a run may add splits to a
        store), the compact options only where they differ from their defaults, so a store traced before they
        existed keeps its identity and a default store's files are what they were."""
        defaults = asdict(TraceConfig())
        return {
            key: value
            for key, value in asdict(self).items()
            if key != "splits" and (key not in COMPACT_OPTIONS or value != defaults[key])
        }


# How trace.hidden_dtype stores hidden states: numpy has no bfloat16, so its raw 16 bits are kept as uint16
# (speculation.traces.store encodes and decodes them; readers see float32).
HIDDEN_DTYPES = ("float16", "bfloat16")
COMPACT_OPTIONS = ("hidden_dtype", "gate_lookahead", "hidden_projection", "projection_seed")
