"""Typed config schemas for every stage, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` supply values; these dataclasses supply types and ranges. Hydra rejects a value of
the wrong type or an unknown enum member when it composes the config, and ``__post_init__`` rejects values that
type-check but make no sense (a non-positive expert count, say) when a stage converts the config with
:func:`to_object`. Either way the user gets one message naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum  # members compare equal to their values: Gate.linear == "linear"
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from speculation.cache.config import HardwareConfig, SimConfig, TargetConfig
from speculation.checks import positive as _positive
from speculation.checks import require as _require

# The repository's conf/ directory. Absolute, because Hydra resolves a relative config_path against the
# importing package when a console script runs, not against the file.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class Gate(StrEnum):
    linear = "linear"  # Switch: logits = x W
    noisy = "noisy"  # Shazeer et al. 2017: learned Gaussian noise on the logits while training
    cosine = "cosine"  # X-MoE (Chi et al. 2022): cosine of a low-dim projection and expert embeddings


class Selection(StrEnum):
    topk = "topk"  # a fixed k experts per token
    adaptive_k = "adaptive_k"  # 1..k_max experts per token, more when the router is unsure


class ModelKind(StrEnum):
    embedded = "embedded"  # the Switch LM defined in speculation/models
    hf = "hf"  # any supported HuggingFace MoE, loaded with from_pretrained from a hub id or local dir


class CorpusKind(StrEnum):
    stdlib = "stdlib"  # the running interpreter's standard library sources
    text_files = "text_files"  # a glob of the user's files
    hf_dataset = "hf_dataset"  # datasets.load_dataset


class LoggerBackend(StrEnum):
    wandb = "wandb"
    none = "none"


@dataclass
class RouterConfig:
    """How each MoE layer picks experts. Presets live in ``conf/router/``."""

    gate: Gate = Gate.linear
    selection: Selection = Selection.topk
    k: int = 1  # experts per token for selection=topk
    k_max: int = 2  # upper bound for selection=adaptive_k
    capacity_factor: float | None = None  # None: no dropping; else capacity = ceil(cf * tokens * k / E)
    temperature: float = 1.0  # logits are divided by this before the softmax
    span_length: int = 1  # >1: one routing decision per span of tokens, made by the span's first token
    cosine_dim: int = 16  # projection size for gate=cosine
    load_balance_coef: float = 0.01  # Switch eq. 4 weight (alpha)
    z_loss_coef: float = 0.001  # ST-MoE eq. 5 weight

    def __post_init__(self) -> None:
        _positive("router.k", self.k, "Use k >= 1 experts per token.")
        _positive("router.k_max", self.k_max)
        _positive("router.temperature", self.temperature, "Use 1.0 for the plain softmax.")
        _positive("router.span_length", self.span_length, "Use 1 for per-token routing.")
        _positive("router.cosine_dim", self.cosine_dim)
        if self.capacity_factor is not None:
            _positive("router.capacity_factor", self.capacity_factor, "Use null to disable token dropping.")
        _require(self.load_balance_coef >= 0, f"router.load_balance_coef={self.load_balance_coef} must be >= 0.")
        _require(self.z_loss_coef >= 0, f"router.z_loss_coef={self.z_loss_coef} must be >= 0.")

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RouterConfig:
        """Rebuild from ``asdict`` output that went through JSON (which turned the enums into their values)."""
        return cls(**{**values, "gate": Gate(values["gate"]), "selection": Selection(values["selection"])})

    @property
    def max_experts_per_token(self) -> int:
        return self.k_max if self.selection == Selection.adaptive_k else self.k


@dataclass
class ModelConfig:
    """The source MoE model. ``kind=embedded`` builds (and trains) our Switch LM; ``kind=hf`` loads ``path``.

    For ``kind=hf`` the architecture fields below are ignored: the checkpoint's config defines the model.
    """

    kind: ModelKind = ModelKind.embedded
    name: str | None = "switch-lm"  # None: the last component of ``path``
    path: str | None = None  # kind=hf: hub id (e.g. google/switch-base-8) or local directory
    dtype: str = "float32"  # kind=hf: float32 | bfloat16 | float16 weights
    encoder_fraction: float = 0.5  # encoder-decoder models: share of each traced chunk the encoder reads
    vocab_size: int = 4096
    d_model: int = 128
    num_layers: int = 12
    num_heads: int = 4
    d_ff: int = 512
    num_experts: int = 8
    moe_every: int = 2  # layers moe_every-1, 2*moe_every-1, ... are MoE (switch-base-8: every other layer)
    max_seq_len: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == ModelKind.hf:
            _require(
                bool(self.path),
                "model=hf needs model.path: a hub id (e.g. google/switch-base-8) or a local checkpoint directory.",
            )
        _require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype={self.dtype!r} is not one of float32, bfloat16, float16.",
        )
        _require(
            0 < self.encoder_fraction < 1,
            f"model.encoder_fraction={self.encoder_fraction} must be in (0, 1): both encoder and decoder need tokens.",
        )
        _positive("model.num_experts", self.num_experts, "An MoE needs at least one expert.")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "moe_every", "max_seq_len"):
            _positive(f"model.{name}", getattr(self, name))
        _require(
            self.d_model % self.num_heads == 0,
            f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}.",
        )
        _require(
            self.moe_every <= self.num_layers,
            f"model.moe_every={self.moe_every} exceeds model.num_layers={self.num_layers}: the model would have "
            "no MoE layer. Lower moe_every.",
        )
        _require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1).")

    @property
    def display_name(self) -> str:
        return self.name or str(self.path).rstrip("/").split("/")[-1]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0]


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
        _require(
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
            f"corpus.val_fraction={self.val_fraction} and corpus.test_fraction={self.test_fraction} must be in "
            "[0, 1) and sum to less than 1.",
        )
        if self.max_documents is not None:
            _positive("corpus.max_documents", self.max_documents, "Use null to keep all documents.")
        if self.kind == CorpusKind.text_files:
            _require(bool(self.glob), "corpus=text_files needs corpus.glob, e.g. corpus.glob='docs/**/*.md'.")
        if self.kind == CorpusKind.hf_dataset:
            _require(bool(self.dataset), "corpus=hf_dataset needs corpus.dataset, e.g. corpus.dataset=wikitext.")


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "lr", "eval_every", "eval_batches", "checkpoint_every"):
            _positive(f"source_train.{name}", getattr(self, name))
        _require(self.warmup_steps >= 0, f"source_train.warmup_steps={self.warmup_steps} must be >= 0.")
        _require(0 <= self.min_lr_ratio <= 1, f"source_train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        _require(self.grad_clip > 0 or math.isinf(self.grad_clip), "source_train.grad_clip must be > 0.")


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

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "batches_per_shard"):
            _positive(f"trace.{name}", getattr(self, name))
        unknown = sorted(set(self.splits) - {"train", "val", "test"})
        _require(not unknown, f"trace.splits has unknown split(s) {unknown}; use train, val and/or test.")
        if self.max_tokens_per_split is not None:
            _positive("trace.max_tokens_per_split", self.max_tokens_per_split, "Use null for whole splits.")


@dataclass
class LoggerConfig:
    """Experiment tracking. W&B runs offline unless ``mode=online``; ``logger=none`` turns it off."""

    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "moe-speculation"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # defaults to the experiment name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(
            self.mode in ("offline", "online", "disabled"),
            f"logger.mode={self.mode!r} is not one of offline, online, disabled.",
        )


@dataclass
class CollectConfig:
    """``spec-collect``: train or load the source model, trace every split into ``workdir/traces``."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"  # shared by all stages
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    source_train: SourceTrainConfig = field(default_factory=SourceTrainConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _require(bool(str(self.workdir).strip()), "workdir is empty; pass workdir=DIR.")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device={self.device!r} is not auto, cpu or cuda[:N].",
        )
        if self.model.kind == ModelKind.embedded:
            _require(
                self.router.max_experts_per_token <= self.model.num_experts,
                f"router asks for {self.router.max_experts_per_token} experts per token but model.num_experts="
                f"{self.model.num_experts}. Lower router.k / router.k_max or raise model.num_experts.",
            )
            for name, length in (
                ("source_train.seq_len", self.source_train.seq_len),
                ("trace.seq_len", self.trace.seq_len),
            ):
                _require(
                    length <= self.model.max_seq_len,
                    f"{name}={length} exceeds model.max_seq_len={self.model.max_seq_len}.",
                )


HEURISTIC_METHODS = [
    "random",
    "frequency",
    "previous_token",
    "layer_minus_1",
    "multi_layer",
    "pattern",
    "adaptive",
    "gate_lookahead",
    "oracle",
]


@dataclass
class EvalConfig:
    """What ``spec-evaluate`` scores and how."""

    split: str = "test"  # the traced split scored (predictors are fitted on train)
    stack: str = "decoder"  # decoder: workdir/traces; encoder: workdir/traces/encoder (encoder-decoder models)
    max_lookahead: int = 3  # lookaheads d = 1..max_lookahead
    prefetch_budget: int = 2  # B in recall@B: experts prefetched per token and layer
    methods: list[str] = field(default_factory=lambda: list(HEURISTIC_METHODS))  # baselines and heuristics
    bootstrap: int = 1000  # document resamples for confidence intervals
    seed: int = 0
    block_rows: int = 65536  # rows per evaluation block (whole sequences; bounds memory)
    max_tokens: int | None = None  # stop after about this many tokens (whole blocks); None = the whole split

    def __post_init__(self) -> None:
        for name in ("max_lookahead", "prefetch_budget", "block_rows"):
            _positive(f"eval.{name}", getattr(self, name))
        _require(self.bootstrap >= 0, f"eval.bootstrap={self.bootstrap} must be >= 0 (0 skips intervals).")
        unknown = [m for m in self.methods if m not in HEURISTIC_METHODS]
        _require(not unknown, f"eval.methods has unknown method(s) {unknown}; choose from {HEURISTIC_METHODS}.")
        _require(self.stack in ("decoder", "encoder"), f"eval.stack={self.stack!r} is not decoder or encoder.")


@dataclass
class EvaluateConfig:
    """``spec-evaluate``: score heuristics, baselines and trained predictors on ``workdir/traces``."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


class PredictorKind(StrEnum):
    contextual = "contextual"  # attention over the current token's last layers' routing + its hidden state
    transformer = "transformer"  # causal transformer over earlier tokens + LSTM over the current token's layers
    hierarchical = "hierarchical"  # token-level and sequence-level heads mixed by learned fusion weights


@dataclass
class PredictorConfig:
    """A learned predictor's architecture (``conf/predictor/``)."""

    kind: PredictorKind = PredictorKind.contextual
    d_model: int = 64
    max_lookahead: int = 4  # predicts layers l+1 .. l+max_lookahead in one pass
    context_layers: int = 3  # contextual: the current token's last layers it attends over
    num_heads: int = 4
    num_blocks: int = 2  # transformer: causal blocks over tokens
    dropout: float = 0.1
    max_positions: int = 512

    def __post_init__(self) -> None:
        for name in ("d_model", "max_lookahead", "context_layers", "num_heads", "num_blocks", "max_positions"):
            _positive(f"predictor.{name}", getattr(self, name))
        _require(0 <= self.dropout < 1, f"predictor.dropout={self.dropout} must be in [0, 1).")


@dataclass
class LossConfig:
    """Weights of the predictor's loss terms (``speculation/losses.py``); 0 turns a term off."""

    routing_mode: str = "ce"  # ce: cross-entropy to the router's top-1 | kl: KL(router || prediction)
    routing: float = 1.0
    confidence: float = 0.5
    consistency: float = 0.0
    diversity: float = 0.05

    def __post_init__(self) -> None:
        _require(self.routing_mode in ("ce", "kl"), f"loss.routing_mode={self.routing_mode!r} is not ce or kl.")
        for name in ("routing", "confidence", "consistency", "diversity"):
            _require(getattr(self, name) >= 0, f"loss.{name}={getattr(self, name)} must be >= 0.")


@dataclass
class PredictorTrainConfig:
    """Optimisation of a learned predictor (``conf/train/``)."""

    steps: int = 1000
    batch_size: int = 32  # windows (traced sequences) per step
    lr: float = 2.0e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.15  # MLM-style: share of (token, layer) routing inputs hidden during training
    eval_every: int = 250
    val_windows: int = 256  # fixed validation windows for early stopping
    patience: int = 4  # evaluations without improvement before stopping
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "eval_every", "val_windows", "patience", "checkpoint_every"):
            _positive(f"train.{name}", getattr(self, name))
        _require(0 <= self.mask_prob < 1, f"train.mask_prob={self.mask_prob} must be in [0, 1).")


@dataclass
class PipelineConfig(CollectConfig):
    """``spec-pipeline``: every stage that exists, in order, on one workdir."""

    seed: int = 0
    run_name: str | None = None  # predictor dir name; None: <predictor kind>-seed<seed>
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)
    predictors: list[PredictorKind] = field(default_factory=lambda: list(PredictorKind))  # trained by the pipeline
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sim: SimConfig = field(default_factory=SimConfig)


@dataclass
class TrainConfig:
    """``spec-train``: fit one learned predictor on ``workdir/traces``."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"
    device: str = "auto"
    seed: int = 0
    run_name: str | None = None
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @property
    def name(self) -> str:
        return self.run_name or f"{self.predictor.kind}-seed{self.seed}"


Config = TypeVar("Config")


def to_object(cfg: DictConfig | Any, schema: type[Config]) -> Config:
    """Turn a composed DictConfig into its dataclass (running every ``__post_init__`` check).

    A dataclass of another schema (the pipeline's, say) is projected onto ``schema``'s fields.
    """
    if isinstance(cfg, schema):
        return cfg
    names = [f.name for f in dataclasses.fields(schema)]
    if dataclasses.is_dataclass(cfg):
        return schema(**{name: getattr(cfg, name) for name in names})
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a DictConfig or {schema.__name__}, got {type(cfg).__name__}")
    # Stage configs share one schema (so experiment files apply to every stage); keep this stage's part.
    own = OmegaConf.masked_copy(cfg, [name for name in names if name in cfg])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), own))


def register_configs() -> None:
    """Make the schemas available to ``defaults`` lists as ``<stage>_schema``."""
    store = ConfigStore.instance()
    store.store(name="pipeline_schema", node=PipelineConfig)


register_configs()
