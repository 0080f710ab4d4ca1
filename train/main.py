"""``spec-train``: fit one learned routing predictor on a workdir's traces.

spec-train predictor=contextual workdir=outputs/default
spec-train -m predictor=contextual,transformer,hierarchical seed=0,1,2 hydra/launcher=local
spec-train experiment=smoke predictor=hierarchical loss.consistency=0.1
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from collect.main import resolve_device
from speculation.config import CONF_DIR, TrainConfig, to_object
from speculation.predictors.training import train_predictor
from speculation.traces import TraceStore
from speculation.tracking import start_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig | TrainConfig) -> dict:
    """Run the train stage; returns the predictor's metrics (``workdir/predictors/<run>/metrics.json``)."""
    cfg = to_object(cfg, TrainConfig)
    workdir = Path(cfg.workdir)
    store = TraceStore.open(workdir / "traces")
    out_dir = workdir / "predictors" / cfg.name
    tracker = start_run(
        cfg.logger,
        workdir,
        job_type="train",
        name=f"train-{cfg.name}",
        config=json.loads(json.dumps(asdict(cfg), default=str)),
        default_group=cfg.experiment_name,
        tags=[str(store.manifest["model"]["name"]), str(cfg.predictor.kind)],
    )
    try:
        metrics = train_predictor(cfg, store, out_dir, resolve_device(cfg.device), tracker)
        tracker.summary({f"best/{k}": v for k, v in (metrics.get("best") or {}).items()})
        log.info("predictor %s written to %s: %s", cfg.name, out_dir, metrics.get("best"))
    finally:
        tracker.finish()
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
