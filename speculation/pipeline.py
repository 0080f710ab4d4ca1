"""``spec-pipeline``: every stage that exists, in order, on one workdir.

Today: ``collect`` (trace the source model), ``train`` (the configured learned predictor), ``evaluate`` (it,
every heuristic and baseline, on held-out documents). Each stage is the same pure
function its own console script wraps, so ``spec-pipeline X=Y`` equals running the stages one by one with X=Y.
"""

from __future__ import annotations

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

# PipelineConfig extends every stage's config, so each stage function takes it as is.
STAGES = {"collect": collect, "train": train, "evaluate": evaluate}


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
    log.info("pipeline done: %s (workdir %s)", timings, Path(cfg.workdir))
    return timings


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    pipeline(cfg)


if __name__ == "__main__":
    main()
