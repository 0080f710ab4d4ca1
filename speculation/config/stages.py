"""The stage schemas: which groups each console script reads (``conf/collect.yaml``, ``train.yaml``,
``evaluate.yaml``, ``pipeline.yaml``).

All four compose from one registered schema, :class:`PipelineConfig`, so an ``experiment=`` file applies to every
stage; :func:`speculation.config.to_object` projects it onto the stage's own schema.
"""

from __future__ import annotations

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
    threads: int | None = None  # torch CPU threads; None leaves torch's default
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
    seed: int = 0
    run_name: str | None = None
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PredictorTrainConfig = field(default_factory=PredictorTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _check_device(self.device)
        check_seed("seed", self.seed)

    @property
    def name(self) -> str:
        """The run's directory name under ``Workdir.predictors``."""
        return self.run_name or f"{self.predictor.kind}-seed{self.seed}"


# TrainConfig keys that say where or how a run executes, not what it learns: left out of a run's identity.
PLACEMENT_KEYS = ("experiment_name", "workdir", "device", "run_name", "logger", "train.overwrite")


def seed_group(run_name: str) -> str:
    """The group of runs that differ only in their seed: ``transformer-seed2`` -> ``transformer``."""
    return re.sub(r"-seed\d+$", "", run_name)


@dataclass
class EvaluateConfig:
    """``spec-evaluate``: score heuristics, baselines and trained predictors on ``workdir/traces``, then simulate."""

    experiment_name: str = "default"
    workdir: str = "outputs/${experiment_name}"
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("seed", self.seed)
