"""The evaluate stage: score heuristics, baselines and trained predictors on a workdir's traces, replay their
predictions in the prefetch-cache simulator, write ``Workdir.eval()`` and log it.

:func:`evaluate` is four steps, each a function of its own: :func:`score` (metrics.csv's rows),
:func:`speculation.cache.report.simulate` (simulation.csv's), :func:`write` (every file) and :func:`log` (W&B).
Every rule between the config and the traces is checked before the first step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from speculation.cache import tables as sim_tables
from speculation.cache.report import Simulation, simulate, write_simulation
from speculation.cache.report import figures as simulation_figures
from speculation.cache.report import headline_sentence as simulation_headline
from speculation.cache.report import markdown_sections as simulation_sections
from speculation.cache.simulation import check_predictor_costs
from speculation.config import to_object
from speculation.config.rules import fitted_evaluation
from speculation.config.stages import EvaluateConfig
from speculation.distributed import active, launch_ranks
from speculation.environment import environment
from speculation.errors import UserError
from speculation.evaluation import report, tables
from speculation.evaluation.runner import EvaluationResult, check_split, evaluate_predictors
from speculation.io import atomic_write_text
from speculation.locks import locked
from speculation.plots import save_figure
from speculation.predictors.base import Predictor
from speculation.predictors.loading import build_heuristics, load_trained_predictors
from speculation.predictors.trained import TrainedPredictor, kind_of
from speculation.stages.job import apply_threads
from speculation.traces import TraceStore
from speculation.traces.analysis import trace_identity
from speculation.tracking import Tracker, run_tags, start_run, traces_context
from speculation.workdir import FIGURES_DIR, REPORT_FILE, Workdir

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """What :func:`score` measured: metrics.csv's frame (seed means appended) and the raw result behind it."""

    result: EvaluationResult
    frame: pd.DataFrame
    context: dict  # the setting the report's header states


def open_traces(cfg: EvaluateConfig, verify: bool = True) -> tuple[TraceStore, EvaluateConfig]:
    """The store of ``eval.stack``, and ``cfg`` fitted to it (its ``null`` lookaheads and cache fractions filled
    in from the traced geometry), with every rule between the config and these traces checked.

    ``verify``: hash every shard against the manifest (``TraceStore.open``); the rules need the manifest only.
    """
    store = TraceStore.open(Workdir(cfg.workdir).traces(cfg.eval.stack), verify=verify)
    eval_cfg, sim = fitted_evaluation(cfg.eval, cfg.sim, store.manifest.sizes, str(store.root))
    check_split(store, cfg.eval.split)
    return store, dataclasses.replace(cfg, eval=eval_cfg, sim=sim)


def methods_for(cfg: EvaluateConfig, store: TraceStore) -> tuple[list[Predictor], dict[str, str]]:
    """The heuristics and baselines of ``eval.methods`` and every trained predictor; the skipped ones, with why."""
    heuristics, skipped = build_heuristics(cfg.eval.methods, store, cfg.eval.seed)
    trained, unfinished = load_trained_predictors(Workdir(cfg.workdir).predictors, store)
    methods = heuristics + trained
    return methods, skipped | unfinished | short_reach(cfg, methods)


def short_reach(cfg: EvaluateConfig, methods: list[Predictor]) -> dict[str, str]:
    """The methods that predict fewer lookaheads than ``eval.max_lookahead`` / ``sim.lookaheads`` ask for: the
    rows and replays they leave out, said in the report instead of silently missing."""
    notes = {}
    for method in methods:
        reach = method.max_lookahead
        if reach is None:
            continue
        rows = list(range(reach + 1, cfg.eval.max_lookahead + 1))
        replays = [d for d in cfg.sim.lookaheads if d > reach] if cfg.sim.enabled else []
        if rows or replays:
            missing = [f"metrics rows at d = {rows}"] * bool(rows) + [f"simulation at d = {replays}"] * bool(replays)
            notes[f"{method.name} at d > {reach}"] = (
                f"it predicts lookaheads 1..{reach} only, so it has no {' and no '.join(missing)}; "
                f"{method.reach_fix(max(rows + replays))} to fill them."
            )
    return notes


def domains(store: TraceStore, methods: list[Predictor]) -> dict[str, str]:
    """Each trained predictor's domain: ``in`` if it was trained on traces of this corpus, ``out`` if of another
    (the same model traced on another corpus: ``model.source_workdir``), ``unknown`` for runs that predate the
    record."""
    corpus = (store.manifest.raw.get("corpus") or {}).get("fingerprint")
    out = {}
    for method in methods:
        if isinstance(method, TrainedPredictor):
            trained_on = method.trained_on_corpus
            out[method.name] = "unknown" if trained_on is None else "in" if trained_on == corpus else "out"
    return out


def run_identity(cfg: EvaluateConfig, store: TraceStore) -> dict[str, Any]:
    """The identity columns of metrics.csv and simulation.csv: what the traces are, the split, the workdir."""
    return {**trace_identity(store), "split": cfg.eval.split, "workdir": str(Path(cfg.workdir).resolve())}


def score(cfg: EvaluateConfig, store: TraceStore, methods: list[Predictor], skipped: dict[str, str]) -> Scores:
    """Every method on ``eval.split``: metrics.csv's frame, with the mean of each seed group appended."""
    result = evaluate_predictors(
        store,
        methods,
        split=cfg.eval.split,
        max_lookahead=cfg.eval.max_lookahead,
        budget=cfg.eval.prefetch_budget,
        block_rows=cfg.eval.block_rows,
        bootstrap=cfg.eval.bootstrap,
        seed=cfg.eval.seed,
        max_tokens=cfg.eval.max_tokens,
        miss_window=cfg.eval.miss_window,
    )
    result.skipped = skipped
    groups = {m.name: m.group for m in methods if isinstance(m, TrainedPredictor)}
    kinds = {m.name: kind_of(m) for m in methods}
    frame = report.seed_means(report.metrics_frame(result, kinds, run_identity(cfg, store)), groups)
    context = {
        "model": store.manifest.model_name,
        "split": cfg.eval.split,
        "stack": cfg.eval.stack,
        "documents": int(tables.aggregate(frame)["n_docs"].max()),
        "bootstrap": cfg.eval.bootstrap,
        "prefetch_budget": cfg.eval.prefetch_budget,
        "miss_window": cfg.eval.miss_window,
        "traces": str(store.root),
        "domains": domains(store, methods),
        "corpus": store.manifest.raw.get("corpus"),  # kind, fingerprint and document count of the traced corpus
        "environment": environment(),
    }
    return Scores(result, frame, context)


def write(eval_dir: Path, scores: Scores, simulation: Simulation | None, budget: int) -> dict[str, Path]:
    """Figures, metrics.csv / metrics.json, simulation.csv / simulation.json and report.md under ``eval_dir``."""
    figures = report.figures(scores.frame, scores.result, budget)
    if simulation is not None:
        figures |= simulation_figures(simulation)
    figure_paths = {name: save_figure(fig, eval_dir / FIGURES_DIR / f"{name}.png") for name, fig in figures.items()}
    paths = report.write_metrics(eval_dir, scores.frame, scores.result, scores.context, figure_paths)
    headline = simulation_headline(simulation) if simulation is not None else []
    lines = report.markdown_sections(scores.frame, scores.result, scores.context, budget, headline)
    if simulation is not None:
        paths |= write_simulation(eval_dir, simulation)
        lines += simulation_sections(simulation)
    lines += ["## Figures", ""] + [f"![{name}]({path.relative_to(eval_dir)})" for name, path in figure_paths.items()]
    atomic_write_text(eval_dir / REPORT_FILE, "\n".join(lines) + "\n")
    return {"report": eval_dir / REPORT_FILE, **paths, **figure_paths}


def log_results(tracker: Tracker, scores: Scores, simulation: Simulation | None, paths: dict[str, Path]) -> None:
    """The evaluation's tables, headline numbers and figures to the tracker."""
    aggregate = tables.aggregate(scores.frame)
    tracker.log_table("eval/metrics", aggregate)
    if simulation is not None:
        tracker.log_table("eval/simulation", simulation.frame)
    tracker.summary(headline_summary(aggregate, simulation))
    tracker.log_images("eval", paths)


SUMMARY_METRICS = ("top1_acc", "recall_at_budget", "ece", "kl", "miss_top1_acc")  # per method and lookahead


def headline_summary(aggregate: pd.DataFrame, simulation: Simulation | None) -> dict[str, float | str]:
    """The evaluate run's W&B summary: :data:`SUMMARY_METRICS` as ``<method>/d<d>/<metric>``, and the simulation's
    headline (:func:`speculation.cache.tables.headline_numbers`) under ``sim/``."""
    summary: dict[str, float | str] = {
        f"{row['method']}/d{row['lookahead']}/{metric}": float(row[metric])
        for _, row in aggregate.iterrows()
        for metric in SUMMARY_METRICS
    }
    if simulation is not None:
        headline = sim_tables.headline_numbers(simulation.table, simulation.fraction, simulation.lookahead)
        summary |= {f"sim/{key}": value for key, value in headline.items()}
    return summary


def evaluate(cfg: DictConfig | EvaluateConfig) -> dict:
    """Run the evaluate stage; returns the pooled rows, the simulation frame and the paths."""
    cfg = to_object(cfg, EvaluateConfig)
    if (ranks := launch_ranks()).world > 1 and not active():  # the pipeline's ranks wait while rank 0 evaluates
        raise UserError(
            f"spec-evaluate runs in one process, not as rank {ranks.rank} of {ranks.world} under torchrun: its "
            "simulation and tables are cheap next to collection and training. Run it without torchrun."
        )
    workdir = Workdir(cfg.workdir)
    apply_threads(cfg.threads)
    with (
        locked(workdir.lock("traces"), f"the traces of {workdir.root}", shared=True),
        locked(workdir.lock(f"eval-{cfg.eval.stack}"), f"the evaluation {workdir.eval(cfg.eval.stack)}"),
    ):
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateConfig) -> dict:
    store, cfg = open_traces(cfg)
    methods, skipped = methods_for(cfg, store)
    if cfg.sim.enabled:
        check_predictor_costs(cfg.sim, [m.kind for m in methods if isinstance(m, TrainedPredictor)])
    context = traces_context(store)
    tracker = start_run(
        cfg,
        job_type="evaluate",
        name=f"evaluate-{store.manifest.model_name}-{cfg.eval.split}",
        tags=[*run_tags(context), *[m.name for m in methods if isinstance(m, TrainedPredictor)]],
        traces=context,
    )
    try:
        scores = score(cfg, store, methods, skipped)
        simulation = None
        if cfg.sim.enabled:
            simulation = simulate(
                store, methods, cfg.eval.split, cfg.sim, cfg.hardware, cfg.target, run_identity(cfg, store)
            )
            log.info("simulation: %d replays, %.1f M layer-events/s", simulation.stats["runs"],
                     simulation.stats["events_per_s"] / 1e6)  # fmt: skip
        eval_dir = Workdir(cfg.workdir).eval(cfg.eval.stack)
        paths = write(eval_dir, scores, simulation, cfg.eval.prefetch_budget)
        log_results(tracker, scores, simulation, paths)
        result = scores.result
        log.info("evaluation written to %s (%d tokens, %.0f tokens/s)", eval_dir, result.tokens,
                 result.tokens / result.seconds)  # fmt: skip
    finally:
        tracker.finish()
    return {
        "aggregate": tables.aggregate(scores.frame).to_dict(orient="records"),
        "simulation": simulation.frame if simulation else None,
        "paths": {k: str(v) for k, v in paths.items()},
    }
