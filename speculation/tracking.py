"""Weights & Biases tracking: offline by default, a no-op with ``logger=none``.

Every stage opens one run with a readable ``name``, ``group`` (the experiment or sweep), ``job_type`` (the stage)
and ``tags``, and writes it under ``Workdir.wandb`` so ``wandb sync`` can upload it later. Its config is the whole
stage config, the ``environment`` that ran it and, for stages that read traces, ``traces`` (model, router, corpus:
what W&B filters by). Its id derives from the workdir, stage and name, so a rerun or a resumed run continues the
same W&B run instead of adding a duplicate. Only this module imports wandb: the stages log numbers, tables and
figures through :class:`Tracker`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from speculation.config.logger import LoggerBackend, LoggerConfig
from speculation.distributed import launch_ranks
from speculation.environment import environment
from speculation.traces.analysis import trace_identity
from speculation.workdir import Workdir


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

    def log_images(self, prefix: str, paths: Mapping[str, Path]) -> None:
        """Every PNG of ``paths`` under ``<prefix>/<name>``."""
        for name, path in paths.items():
            if Path(path).suffix == ".png":
                self.log_image(f"{prefix}/{name}", Path(path))

    def log_table(self, key: str, frame: pd.DataFrame) -> None:
        if self.run is not None:
            import wandb

            # W&B serializes cells as JSON: nullable columns' pd.NA (metrics.csv's pooled rows have no layer) -> None
            plain = frame.astype(object).where(frame.notna(), None)
            self.run.log({key: wandb.Table(dataframe=plain)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def traces_context(store: Any) -> dict[str, Any]:
    """What a train or evaluate run's traces are, for its W&B config: model, router, corpus and fingerprint."""
    labels = trace_identity(store)
    return {"model": labels["model"], "router": labels["router"], "corpus": store.manifest.raw.get("corpus"),
            "fingerprint": store.manifest.fingerprint()}  # fmt: skip


def run_tags(context: dict[str, Any]) -> list[str]:
    """Tags that tell runs apart in W&B: the model and ``router-<label>`` (``hf`` when the router is the model's)."""
    return [context["model"], f"router-{context['router']}"]


def run_id(workdir: Path, job_type: str, name: str) -> str:
    """One W&B id per (workdir, stage, run name): a rerun resumes that run."""
    return hashlib.sha256(f"{Path(workdir).resolve()}|{job_type}|{name}".encode()).hexdigest()[:20]


def start_run(
    stage_cfg: Any,
    job_type: str,
    name: str,
    tags: list[str] | None = None,
    traces: dict[str, Any] | None = None,
) -> Tracker:
    """Open a W&B run for a stage (or a disabled tracker) from its config dataclass: its ``logger`` section, its
    ``workdir``, its ``experiment_name`` (the default group) and the whole config, the environment and ``traces``
    (:func:`traces_context`) as the run's config.

    ``WANDB_MODE=disabled`` in the environment also turns it off, and so does being a rank other than 0 under
    torchrun: rank 0 logs for the launch.
    """
    cfg: LoggerConfig = stage_cfg.logger
    if cfg.backend == LoggerBackend.none or cfg.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return Tracker()
    if not launch_ranks().is_main:
        return Tracker()
    import wandb

    workdir = Workdir(stage_cfg.workdir)
    workdir.root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        dir=str(workdir.root),  # wandb makes its wandb/ folder here: Workdir.wandb
        group=cfg.group or stage_cfg.experiment_name,
        job_type=job_type,
        name=name,
        tags=sorted({*cfg.tags, *(tags or [])}),
        config={
            **json.loads(json.dumps(dataclasses.asdict(stage_cfg), default=str)),
            "environment": environment(),
            **({"traces": traces} if traces is not None else {}),
        },
        id=run_id(workdir.root, job_type, name),
        resume="allow",  # the same run again (a rerun, a resume after a kill) continues it
        reinit="finish_previous",
    )
    return Tracker(run)
