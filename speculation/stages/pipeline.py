"""``spec-pipeline``: every stage, in order, on one workdir; the README's main job.

``collect`` (trace the source model), ``train`` (one learned predictor per kind in ``predictors``), ``evaluate``
(them, every heuristic and baseline, on held-out documents; then the prefetch-cache simulation) and
``eval/report.md``. Each stage is the same pure function its own console script wraps, so ``spec-pipeline X=Y``
equals running the stages one by one with X=Y. The rules between the evaluation config and the traced geometry are
checked before the first stage where the geometry is known from the config (the embedded model), and right after
collection otherwise, so a config that cannot be evaluated fails before any training.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from omegaconf import DictConfig

from speculation.config import to_object
from speculation.config.model import ModelKind
from speculation.config.rules import Geometry, check_evaluation
from speculation.config.stages import PipelineConfig
from speculation.stages.collect import collect
from speculation.stages.evaluate import evaluate, open_traces
from speculation.stages.train import train
from speculation.workdir import REPORT_FILE, Workdir

log = logging.getLogger(__name__)


def check_embedded_geometry(cfg: PipelineConfig) -> None:
    """The evaluation rules against the embedded model's geometry, known before anything is trained."""
    if cfg.model.kind == ModelKind.embedded and cfg.eval.stack == "decoder":
        geometry = Geometry(len(cfg.model.moe_layers), cfg.model.num_experts, cfg.router.max_experts_per_token)
        check_evaluation(cfg.eval, cfg.sim, geometry, f"the traces of model={cfg.model.display_name}")


def collect_and_check(cfg: PipelineConfig) -> None:
    collect(cfg)
    open_traces(cfg, verify=False)  # HF models' rules, on the traced geometry, before any training (train verifies)


def train_all(cfg: PipelineConfig) -> None:
    """One predictor per kind in ``cfg.predictors``, each with the configured architecture, loss and schedule."""
    for kind in cfg.predictors:
        predictor = dataclasses.replace(cfg.predictor, kind=kind)
        run_name = f"{cfg.run_name}-{kind}" if cfg.run_name else None
        train(dataclasses.replace(cfg, predictor=predictor, run_name=run_name))


# PipelineConfig extends every stage's config, so each stage function takes it as is.
STAGES = {"collect": collect_and_check, "train": train_all, "evaluate": evaluate}


def pipeline(cfg: DictConfig | PipelineConfig) -> dict[str, float]:
    """Run every stage; returns each stage's wall time in seconds."""
    cfg = to_object(cfg, PipelineConfig)
    check_embedded_geometry(cfg)
    timings = {}
    for name, stage in STAGES.items():
        started = time.perf_counter()
        log.info("stage %s", name)
        stage(cfg)
        timings[name] = time.perf_counter() - started
        log.info("stage %s done in %.1f s", name, timings[name])
    log.info("pipeline done: %s; report: %s", timings, Workdir(cfg.workdir).eval() / REPORT_FILE)
    return timings
