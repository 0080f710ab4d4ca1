"""The stage schemas: which groups each console script reads (``conf/collect.yaml``, ``train.yaml``,
``evaluate.yaml``, ``pipeline.yaml``).

All four compose from one registered schema, :class:`PipelineConfig`, so an ``experiment=`` file applies to every
stage; :func:`speculation.config.to_object` projects it onto the stage's own schema.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from speculation.config.checks import check_seed, require
from speculation.config.collect import CorpusConfig, SourceTrainConfig, TraceConfig
from speculation.config.evaluate import EvalConfig
from speculation.config.logger import LoggerConfig
from speculation.config.model import ModelConfig, ModelKind, RouterConfig
from speculation.config.predictor import LossConfig, PredictorConfig, PredictorKind, PredictorTrainConfig
from speculation.config.simulate import HardwareConfig, SimConfig, TargetConfig


def _check_device(device: str) -> None:
    require(
        device == "auto" or device == "cpu" or device.startswith("cuda"),
        f"device={device!r} is not auto, cpu or cuda[:N].",
    )


@dataclass
class CollectConfig:
    """``spec-collect``: train or load the source model, trace every split into ``workdir/traces``."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"  # shared by all stages
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None: cores // parallel jobs (stages/job.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    source_train: SourceTrainConfig = field(default_factory=SourceTrainConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        require(bool(str(self.workdir).strip()), "workdir is empty; pass workdir=DIR.")
        _check_device(self.device)
        if self.model.kind == ModelKind.embedded:
            require(
                self.router.max_experts_per_token <= self.model.num_experts,
                f"router asks for {self.router.max_experts_per_token} experts per token but model.num_experts="
                f"{self.model.num_experts}. Lower router.k / router.k_max or raise model.num_experts.",
            )
            for name, length in (
                ("source_train.seq_len", self.source_train.seq_len),
                ("trace.seq_len", self.trace.seq_len),
            ):
                require(
                    length <= self.model.max_seq_len,
                    f"{name}={length} exceeds model.max_seq_len={self.model.max_seq_len}.",
                )


@dataclass
class TrainConfig:
    """``spec-train``: fit one learned predictor on ``workdir/traces``."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    run_name: str | None = None
    command_overrides: list[str] = field(default_factory=list)  # filled by the console script; names the run
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _check_device(self.device)
        check_seed("seed", self.seed)

    @property
    def name(self) -> str:
        """The run's directory name under ``Workdir.predictors``: ``run_name``, or :func:`default_run_name`."""
        return self.run_name or default_run_name(self.predictor.kind, self.seed, self.command_overrides)


# TrainConfig keys that say where or how a run executes, not what it learns: left out of a run's identity.
PLACEMENT_KEYS = (
    "experiment_name", "workdir", "device", "threads", "run_name", "command_overrides", "logger", "train.overwrite",
)  # fmt: skip
# Command-line keys that change what a predictor learns (its architecture, loss and schedule), minus the two that
# name every run anyway (the kind and the seed) and the one that only says whether to replace it.
_LEARNING_GROUPS = ("predictor", "loss", "train")
_NAMED_ANYWAY = ("predictor", "predictor.kind", "seed", "train.overwrite")
_MAX_NAME = 120  # characters; longer names end in a digest of the full one (directory names stay portable)


def learning_overrides(command_overrides: list[str]) -> list[str]:
    """The overrides of ``command_overrides`` that change a predictor's weights, sorted, as ``key=value``."""
    kept = []
    for override in command_overrides:
        override = override.lstrip("+~")
        key = override.split("=", 1)[0]
        if key in _NAMED_ANYWAY:
            continue
        if key in _LEARNING_GROUPS or key.startswith(tuple(f"{group}." for group in _LEARNING_GROUPS)):
            kept.append(re.sub(r"[/\\\s]", "_", override))
    return sorted(kept)


def default_run_name(kind: PredictorKind | str, seed: int, command_overrides: list[str]) -> str:
    """``<kind>[-<learning overrides>]-seed<seed>``: ``contextual-seed0``, or, for ``spec-train loss.confidence=0
    train.lr=0.5``, ``contextual-loss.confidence=0,train.lr=0.5-seed0``; so each point of a sweep over what a run
    learns gets its own directory, and :func:`seed_group` still groups its seeds."""
    overrides = ",".join(learning_overrides(command_overrides))
    if len(overrides) > _MAX_NAME:
        overrides = f"{overrides[:_MAX_NAME]}~{hashlib.sha256(overrides.encode()).hexdigest()[:10]}"
    return "-".join(part for part in (str(kind), overrides, f"seed{seed}") if part)


def seed_group(run_name: str) -> str:
    """The group of runs that differ only in their seed: ``transformer-seed2`` -> ``transformer``."""
    return re.sub(r"-seed\d+$", "", run_name)


@dataclass
class EvaluateConfig:
    """``spec-evaluate``: score heuristics, baselines and trained predictors on ``workdir/traces``, then simulate."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"
    threads: int | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class PipelineConfig(CollectConfig):
    """``spec-pipeline``: every stage that exists, in order, on one workdir."""

    seed: int = 0
    run_name: str | None = None  # prefix of the predictor dirs; None: default_run_name per kind
    command_overrides: list[str] = field(default_factory=list)  # filled by the console script; names the runs
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)
    predictors: list[PredictorKind] = field(default_factory=lambda: list(PredictorKind))  # trained by the pipeline
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("seed", self.seed)
