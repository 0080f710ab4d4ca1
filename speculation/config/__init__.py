"""Typed config schemas, one module per family of ``conf/`` groups, registered in Hydra's ConfigStore.

======================  ==================================================================
module                  ``conf/`` groups
======================  ==================================================================
``config.model``        ``model/``, ``router/``
``config.collect``      ``corpus/``, ``source_train/``, ``trace/``
``config.predictor``    ``predictor/``, ``loss/``, ``train/``
``config.evaluate``     ``eval/``
``config.simulate``     ``hardware/``, ``target/``, ``sim/``
``config.logger``       ``logger/``
``config.stages``       ``collect.yaml``, ``train.yaml``, ``evaluate.yaml``, ``pipeline.yaml``
``config.rules``        rules that need the traced geometry (checked when a stage opens the traces)
======================  ==================================================================

The YAML files under ``conf/`` supply values; these dataclasses supply types and ranges. Hydra rejects a value of
the wrong type or an unknown enum member when it composes the config, and ``__post_init__`` rejects values that
type-check but make no sense (a non-positive expert count, say) when a stage converts the config with
:func:`to_object`. Either way the user gets one message naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from speculation.config.collect import CorpusConfig, CorpusKind, SourceTrainConfig, TraceConfig
from speculation.config.evaluate import HEURISTIC_METHODS, EvalConfig
from speculation.config.logger import LoggerBackend, LoggerConfig
from speculation.config.model import Gate, ModelConfig, ModelKind, RouterConfig, Selection
from speculation.config.predictor import LossConfig, PredictorConfig, PredictorKind, PredictorTrainConfig
from speculation.config.simulate import HardwareConfig, SimConfig, TargetConfig
from speculation.config.stages import CollectConfig, EvaluateConfig, PipelineConfig, TrainConfig

# The repository's conf/ directory. Absolute, because Hydra resolves a relative config_path against the
# importing package when a console script runs, not against the file.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

Config = TypeVar("Config")


def _rank_dir() -> str:
    """``${rank_dir:}`` in Hydra's run dir: ranks 1.. of a torchrun launch log in a ``rank-N/`` of their own, so
    they neither interleave rank 0's log nor look like runs of their own (rank 0's is the launch's)."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"/rank-{rank}"


OmegaConf.register_new_resolver("rank_dir", _rank_dir, replace=True)


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
    """Make the schema available to ``defaults`` lists as ``pipeline_schema``."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


register_configs()

__all__ = [
    "CONF_DIR",
    "HEURISTIC_METHODS",
    "CollectConfig",
    "CorpusConfig",
    "CorpusKind",
    "EvalConfig",
    "EvaluateConfig",
    "Gate",
    "HardwareConfig",
    "LoggerBackend",
    "LoggerConfig",
    "LossConfig",
    "ModelConfig",
    "ModelKind",
    "PipelineConfig",
    "PredictorConfig",
    "PredictorKind",
    "PredictorTrainConfig",
    "RouterConfig",
    "Selection",
    "SimConfig",
    "SourceTrainConfig",
    "TargetConfig",
    "TraceConfig",
    "TrainConfig",
    "register_configs",
    "to_object",
]
