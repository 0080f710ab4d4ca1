"""The train stage: fit one learned routing predictor on a workdir's traces into ``Workdir.run(name)``."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from speculation.config import to_object
from speculation.config.stages import TrainConfig
from speculation.locks import locked
from speculation.predictors.training import train_predictor
from speculation.stages.device import resolve_device
from speculation.stages.job import apply_threads
from speculation.traces import TraceStore
from speculation.tracking import run_tags, start_run, traces_context
from speculation.workdir import Workdir

log = logging.getLogger(__name__)


def train(cfg: DictConfig | TrainConfig) -> dict:
    """Run the train stage; returns the predictor's metrics (its run directory's ``metrics.json``)."""
    cfg = to_object(cfg, TrainConfig)
    workdir = Workdir(cfg.workdir)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out_dir = workdir.run(cfg.name)
    with (
        locked(workdir.lock("traces"), f"the traces of {workdir.root}", shared=True),
        locked(workdir.lock(f"run-{cfg.name}"), f"the run {out_dir}"),
    ):
        store = TraceStore.open(workdir.traces())
        context = traces_context(store)
        tags = [*run_tags(context), str(cfg.predictor.kind)]
        tracker = start_run(cfg, job_type="train", name=f"train-{cfg.name}", tags=tags, traces=context)
        try:
            metrics = train_predictor(cfg, store, out_dir, device, tracker)
            tracker.summary({f"best/{k}": v for k, v in (metrics.get("best") or {}).items()})
            log.info("predictor %s ready in %s: %s", cfg.name, out_dir, metrics.get("best"))
        finally:
            tracker.finish()
    return metrics
