"""``spec-evaluate``: score heuristics, baselines and trained predictors on a workdir's traces, then replay their
predictions in the prefetch-cache simulator (``eval/simulation.csv``).

spec-evaluate workdir=outputs/default
spec-evaluate experiment=smoke eval.max_lookahead=2 eval.prefetch_budget=1
spec-evaluate workdir=outputs/switch-base-8 eval.stack=encoder
spec-evaluate hardware=h100 target=mixtral_8x7b sim.cache_fractions=[0.25,0.5]
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from speculation.cache.report import simulate_and_report
from speculation.config import CONF_DIR, EvaluateConfig, to_object
from speculation.evaluation.loading import build_heuristics, load_trained_predictors
from speculation.evaluation.report import metrics_frame, seed_means, write_outputs
from speculation.evaluation.runner import evaluate_predictors
from speculation.traces import TraceStore
from speculation.tracking import start_run

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig | EvaluateConfig) -> dict:
    """Run the evaluate stage; returns the aggregate rows (layer ``all``) and the output paths."""
    cfg = to_object(cfg, EvaluateConfig)
    workdir = Path(cfg.workdir)
    traces_dir = workdir / "traces" if cfg.eval.stack == "decoder" else workdir / "traces" / cfg.eval.stack
    eval_dir = workdir / "eval" if cfg.eval.stack == "decoder" else workdir / "eval" / cfg.eval.stack
    store = TraceStore.open(traces_dir)
    heuristics, skipped = build_heuristics(cfg.eval.methods, store, cfg.eval.seed)
    trained = load_trained_predictors(workdir / "predictors", store)
    methods = heuristics + trained
    tracker = start_run(
        cfg.logger,
        workdir,
        job_type="evaluate",
        name=f"evaluate-{store.manifest['model']['name']}-{cfg.eval.split}",
        config=json.loads(json.dumps(asdict(cfg), default=str)),
        default_group=cfg.experiment_name,
        tags=[str(store.manifest["model"]["name"]), *[m.name for m in trained]],
    )
    try:
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
        )
        result.skipped = skipped
        frame = seed_means(metrics_frame(result, [m.name for m in methods]), {m.name: m.group for m in trained})
        documents = int(frame[frame["layer"] == "all"]["n_docs"].max())
        context = {
            "model": store.manifest["model"]["name"],
            "split": cfg.eval.split,
            "stack": cfg.eval.stack,
            "documents": documents,
            "bootstrap": cfg.eval.bootstrap,
            "prefetch_budget": cfg.eval.prefetch_budget,
            "traces": str(traces_dir),
        }
        simulation = None
        if cfg.sim.enabled:
            simulation = simulate_and_report(
                store, methods, cfg.eval.split, cfg.sim, cfg.hardware, cfg.target, eval_dir
            )
            log.info("simulation: %d replays, %.1f M layer-events/s", simulation.stats["runs"],
                     simulation.stats["events_per_s"] / 1e6)  # fmt: skip
        paths = write_outputs(
            result,
            frame,
            eval_dir,
            context,
            cfg.eval.prefetch_budget,
            sections=simulation.markdown if simulation else None,
            figures_extra=simulation.paths if simulation else None,
        )
        aggregate = frame[frame["layer"] == "all"]
        if tracker.enabled:
            import wandb

            tracker.log({"eval/metrics": wandb.Table(dataframe=aggregate)})
            if simulation is not None:
                tracker.log({"eval/simulation": wandb.Table(dataframe=simulation.frame)})
            for _, row in aggregate.iterrows():
                tracker.summary({f"{row['method']}/d{row['lookahead']}/top1_acc": row["top1_acc"]})
            for name, path in paths.items():
                if path.suffix == ".png":
                    tracker.log_image(f"eval/{name}", path)
        log.info(
            "evaluation written to %s (%d tokens, %.0f tokens/s)",
            eval_dir,
            result.tokens,
            result.tokens / result.seconds,
        )
    finally:
        tracker.finish()
    return {
        "aggregate": aggregate.to_dict(orient="records"),
        "simulation": simulation.frame if simulation else None,
        "paths": {k: str(v) for k, v in paths.items()},
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
