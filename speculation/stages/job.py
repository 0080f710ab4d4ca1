"""What a stage takes from the Hydra job it runs in: the command line that names its runs, and how many jobs share
the machine's cores.

The console scripts wrap their task in :func:`hydra_job`, so the stage functions stay pure: they read both facts
from their config (``command_overrides``, ``threads``) and behave the same whether a console script, the pipeline
or a notebook calls them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from speculation.distributed import launch_ranks
from speculation.environment import available_cores

log = logging.getLogger(__name__)


def parallel_jobs(hydra_cfg: DictConfig | None) -> int:
    """How many jobs of this launch run at once on this machine: the launcher's ``n_jobs`` in a multirun (joblib's
    ``-1`` means one per core), else 1 (a single run, or a launcher that runs its jobs one after another)."""
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    cores = available_cores()
    return cores if n_jobs < 0 else max(1, min(n_jobs, cores))


def threads_per_job(hydra_cfg: DictConfig | None) -> int:
    """``cores // (parallel jobs × torchrun ranks on this machine)``, at least 1: processes that share the cores
    must not each take all of them."""
    return max(1, available_cores() // (parallel_jobs(hydra_cfg) * launch_ranks().local_world))


def apply_threads(threads: int | None) -> None:
    """Size torch's intra-op pool; ``None`` (a stage called without :func:`hydra_job`) keeps torch's default."""
    import torch  # here: the console scripts import this module before Hydra parses the command line

    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("torch CPU threads: %d", torch.get_num_threads())


def hydra_job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Decorate a ``@hydra.main`` task: fill ``command_overrides`` (the command line's overrides, which name
    predictor runs) and, where ``threads`` is null, ``threads = cores // the launcher's parallel jobs``."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
        if hydra_cfg is not None and "command_overrides" in cfg:
            cfg.command_overrides = list(hydra_cfg.overrides.task)
        if "threads" in cfg and cfg.threads is None:
            cfg.threads = threads_per_job(hydra_cfg)
        return task(cfg)

    return wrapper
