"""The train stage: fit one learned routing predictor on a workdir's traces into ``Workdir.run(name)``.

Under ``torchrun --nproc-per-node N`` every rank runs this stage and trains its share of each batch
(``speculation.predictors.training``); rank 0 alone takes the run's lock and logs to W&B, the others get a
disabled tracker. Every rank holds the traces' shared lock: they all read them.
"""

from __future__ import annotations

import contextlib
import logging

from omegaconf import DictConfig

from speculation.config import to_object
from speculation.config.stages import TrainConfig
from speculation.distributed import launch_ranks, main_decides, process_group
from speculation.locks import locked
from speculation.predictors.training import check_ranks, train_predictor
from speculation.stages.device import resolve_device
from speculation.stages.job import apply_threads
from speculation.traces import TraceStore
from speculation.tracking import run_tags, start_run, traces_context
from speculation.workdir import Workdir

log = logging.getLogger(__name__)


def train(cfg: DictConfig | TrainConfig) -> dict:
    """Run the train stage; returns the predictor's metrics (its run directory's ``metrics.json``)."""
    cfg = to_object(cfg, TrainConfig)
    check_ranks(cfg, launch_ranks())  # before joining the ranks' group: a refusal needs no other rank
    workdir = Workdir(cfg.workdir)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out_dir = workdir.run(cfg.name)
    with process_group(device) as ranks, contextlib.ExitStack() as held:
        held.enter_context(locked(workdir.lock("traces"), f"the traces of {workdir.root}", shared=True))
        # One writer: rank 0 holds the run's lock; the others learn whether it got it (or fail with its message).
        main_decides(lambda: held.enter_context(locked(workdir.lock(f"run-{cfg.name}"), f"the run {out_dir}")))
        store = TraceStore.open(workdir.traces())
        context = traces_context(store)
        tags = [*run_tags(context), str(cfg.predictor.kind)]
        # one W&B run per training run: rank 0's (start_run gives the other ranks a disabled tracker)
        tracker = start_run(cfg, job_type="train", name=f"train-{cfg.name}", tags=tags, traces=context)
        try:
            metrics = train_predictor(cfg, store, out_dir, device, tracker, ranks)
            tracker.summary({f"best/{k}": v for k, v in (metrics.get("best") or {}).items()})
            if ranks.is_main:
                log.info("predictor %s ready in %s: %s", cfg.name, out_dir, metrics.get("best"))
        finally:
            tracker.finish()
    return metrics
