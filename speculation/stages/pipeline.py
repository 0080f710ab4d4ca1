"""``spec-pipeline``: every stage, in order, on one workdir; the README's main job.

``collect`` (trace the source model), ``train`` (one learned predictor per kind in ``predictors``), ``evaluate``
(them, every heuristic and baseline, on held-out documents; then the prefetch-cache simulation) and
``eval/report.md``. Each stage is the same pure function its own console script wraps, so ``spec-pipeline X=Y``
equals running the stages one by one with X=Y. The rules between the evaluation config and the traced geometry are
checked before the first stage: the geometry comes from the config for the embedded model and from the
checkpoint's config.json (a meta-device skeleton, no weights) for an HF model, so a lookahead or cache fraction
that cannot fit fails before anything is trained or traced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import torch
from omegaconf import DictConfig

from speculation.config import to_object
from speculation.config.model import ModelConfig, ModelKind, RouterConfig
from speculation.config.rules import Geometry, fitted_evaluation, learned_input_problem, trace_lookahead_problem
from speculation.config.stages import PipelineConfig
from speculation.distributed import barrier, process_group
from speculation.errors import UserError
from speculation.models.hf import hf_skeleton
from speculation.models.switch_lm import SwitchLM
from speculation.stages.collect import collect
from speculation.stages.device import resolve_device
from speculation.stages.evaluate import evaluate, open_traces
from speculation.stages.train import train
from speculation.tracing.registry import stack_geometry
from speculation.workdir import CONFIG_FILE, REPORT_FILE, Workdir

log = logging.getLogger(__name__)


def embedded_geometry(model: ModelConfig, router: RouterConfig) -> Geometry:
    """The embedded model's decoder geometry as its adapter will record it, read off a meta-device build (no
    weights allocated), so the adapter stays the one owner of how layers and slots are counted."""
    with torch.device("meta"):
        skeleton = SwitchLM(model, router)
    geometry = stack_geometry(skeleton, "decoder")
    assert geometry is not None, "the embedded model always has MoE layers in its decoder"
    return geometry


def planned_geometry(cfg: PipelineConfig) -> Geometry | None:
    """The geometry of the traces ``eval.stack`` will hold, from the config alone (no training, no weights);
    ``None`` where it cannot be known yet (a ``model.source_workdir`` without its model: collect says so first)."""
    if cfg.model.kind == ModelKind.embedded:
        if cfg.eval.stack != "decoder":
            raise UserError(
                f"eval.stack={cfg.eval.stack} but the embedded model is decoder-only; use eval.stack=decoder."
            )
        if cfg.model.source_workdir is None:
            return embedded_geometry(cfg.model, cfg.router)
        saved = Workdir(cfg.model.source_workdir).source_model / CONFIG_FILE  # that model's own architecture
        if not saved.is_file():
            return None
        config = json.loads(saved.read_text())
        model = ModelConfig(**{**config["model"], "kind": ModelKind(config["model"]["kind"])})
        return embedded_geometry(model, RouterConfig.from_json(config["router"]))
    geometry = stack_geometry(hf_skeleton(cfg.model), cfg.eval.stack)
    if geometry is None:
        raise UserError(
            f"eval.stack={cfg.eval.stack} but {cfg.model.display_name} has no MoE layer in its {cfg.eval.stack}; use "
            "eval.stack=decoder."
        )
    return geometry


def check_at_start(cfg: PipelineConfig) -> None:
    """Every rule between the evaluation config and the traced geometry, and between what the traces will keep
    (``trace``) and what the learned predictors read, before the first stage."""
    geometry = planned_geometry(cfg)
    if geometry is None:
        return
    where = f"the traces of model={cfg.model.display_name}"
    fitted_evaluation(cfg.eval, cfg.sim, geometry, where)
    trace = cfg.trace
    every_layer = list(range(geometry.num_layers))
    kept = (every_layer if trace.hidden_layers is None else list(trace.hidden_layers)) if trace.save_hidden else []
    problems = [trace_lookahead_problem(trace.gate_lookahead, geometry.num_layers, f"model={cfg.model.display_name}")]
    if cfg.predictors:  # the learned predictors of spec-pipeline's train stage read the hidden states
        problems.append(learned_input_problem(cfg.predictor, kept, geometry.num_layers, trace.hidden_projection, where))
    if first := next((problem for problem in problems if problem), None):
        raise UserError(first)


def collect_and_check(cfg: PipelineConfig) -> None:
    collect(cfg)
    open_traces(cfg, verify=False)  # the same rules on the manifest written (train verifies the shards)


def train_all(cfg: PipelineConfig) -> None:
    """One predictor per kind in ``cfg.predictors``, each with the configured architecture, loss and schedule."""
    for kind in cfg.predictors:
        predictor = dataclasses.replace(cfg.predictor, kind=kind)
        run_name = f"{cfg.run_name}-{kind}" if cfg.run_name else None
        train(dataclasses.replace(cfg, predictor=predictor, run_name=run_name))


# PipelineConfig extends every stage's config, so each stage function takes it as is.
STAGES = {"collect": collect_and_check, "train": train_all, "evaluate": evaluate}
ONE_PROCESS_STAGES = ("evaluate",)  # under torchrun, rank 0 runs these alone


def pipeline(cfg: DictConfig | PipelineConfig) -> dict[str, float]:
    """Run every stage; returns each stage's wall time in seconds.

    Under torchrun the ranks share one process group for the whole run: they collect and train together, and
    rank 0 evaluates while the others wait (the evaluation runs in one process).
    """
    cfg = to_object(cfg, PipelineConfig)
    check_at_start(cfg)
    timings = {}
    with process_group(resolve_device(cfg.device)) as ranks:
        for name, stage in STAGES.items():
            started = time.perf_counter()
            log.info("stage %s", name)
            if name in ONE_PROCESS_STAGES and not ranks.is_main:
                log.info("rank %d waits while rank 0 runs stage %s", ranks.rank, name)
            else:
                stage(cfg)
            barrier()
            timings[name] = time.perf_counter() - started
            log.info("stage %s done in %.1f s", name, timings[name])
    log.info("pipeline done: %s; report: %s", timings, Workdir(cfg.workdir).eval() / REPORT_FILE)
    return timings
