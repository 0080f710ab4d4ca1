"""``spec-pipeline``: every stage, in order, on one workdir; the README's main job.

``collect`` (trace the source model), ``train`` (one learned predictor per kind in ``predictors``), ``evaluate``
(them, every heuristic and baseline, on held-out documents; then the prefetch-cache simulation) and
``eval/report.md``. Each stage is the same pure function its own console script wraps, so ``spec-pipeline X=Y``
equals running the stages one by one with X=Y.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from collect.main import collect
from evaluate.main import evaluate
from speculation.config import CONF_DIR, PipelineConfig, to_object
from train.main import train

log = logging.getLogger(__name__)


def train_all(cfg: PipelineConfig) -> None:
    """One predictor per kind in ``cfg.predictors``, each with the configured architecture, loss and schedule."""
    for kind in cfg.predictors:
        predictor = dataclasses.replace(cfg.predictor, kind=kind)
        run_name = f"{cfg.run_name}-{kind}" if cfg.run_name else None
        train(dataclasses.replace(cfg, predictor=predictor, run_name=run_name))


# PipelineConfig extends every stage's config, so each stage function takes it as is.
STAGES = {"collect": collect, "train": train_all, "evaluate": evaluate}


def pipeline(cfg: DictConfig | PipelineConfig) -> dict[str, float]:
    """Run every stage; returns each stage's wall time in seconds."""
    cfg = to_object(cfg, PipelineConfig)
    timings = {}
    for name, stage in STAGES.items():
        started = time.perf_counter()
        log.info("stage %s", name)
        stage(cfg)
        timings[name] = time.perf_counter() - started
        log.info("stage %s done in %.1f s", name, timings[name])
    log.info("pipeline done: %s; report: %s", timings, Path(cfg.workdir) / "eval" / "report.md")
    return timings


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    pipeline(cfg)


if __name__ == "__main__":
    main()
