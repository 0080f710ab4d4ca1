"""Weights & Biases tracking: offline by default, a no-op with ``logger=none``.

Every stage opens one run with a readable ``name``, ``group`` (the experiment or sweep), ``job_type`` (the stage)
and ``tags``, and writes it under ``workdir/wandb`` so ``wandb sync`` can upload it later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from speculation.config import LoggerBackend, LoggerConfig


class Tracker:
    """A thin handle on a W&B run; every method is safe to call when tracking is off."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start_run(
    cfg: LoggerConfig,
    workdir: Path,
    job_type: str,
    name: str,
    config: dict[str, Any],
    default_group: str,
    tags: list[str] | None = None,
) -> Tracker:
    """Open a W&B run (or a disabled tracker). ``WANDB_MODE=disabled`` in the environment also turns it off."""
    if cfg.backend == LoggerBackend.none or cfg.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return Tracker()
    import wandb

    workdir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        dir=str(workdir),
        group=cfg.group or default_group,
        job_type=job_type,
        name=name,
        tags=sorted({*cfg.tags, *(tags or [])}),
        config=config,
        reinit="finish_previous",
    )
    return Tracker(run)
