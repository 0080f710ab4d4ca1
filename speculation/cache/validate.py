"""``spec-validate-engine``: replay the same trace in the real engine (CUDA) and in the simulator, side by side.

    spec-calibrate --name mygpu                                   # first: a measured profile
    spec-validate-engine workdir=outputs/default hardware=mygpu sim.max_tokens=2000 sim.lookaheads=[2]

Every policy and cache fraction of ``sim`` runs once in each; both execute one schedule (the simulator's recorded
copies), so hit / miss / prefetch counts agree by construction and the table compares per-token latency. Writes
``eval/engine_validation.csv`` under the workdir (``Workdir.eval()``).
"""

from __future__ import annotations

import dataclasses
import logging

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from speculation.cache.engine import PrefetchEngine, Schedule, require_cuda
from speculation.cache.kernel import Counters, PolicyRun, replay
from speculation.cache.plans import ReplayTrace, rank_predictions
from speculation.cache.simulation import check_predictor_costs, policy_runs
from speculation.cache.timing import TimingModel, resolve_target
from speculation.cli import one_line_errors, run_console
from speculation.config import CONF_DIR, to_object
from speculation.config.rules import cache_slots, fitted_evaluation
from speculation.config.stages import EvaluateConfig
from speculation.io import atomic_path
from speculation.predictors.loading import build_heuristics, load_trained_predictors
from speculation.traces import TraceStore
from speculation.workdir import ENGINE_VALIDATION_CSV, Workdir

log = logging.getLogger(__name__)


def simulate_recorded(trace: ReplayTrace, run: PolicyRun, capacity: int, timing: TimingModel) -> tuple:
    """The simulator's per-token seconds and counters, and the schedule the engine executes."""
    result = replay(
        experts_TLK=trace.experts_TLK, num_experts=trace.num_experts, run=run, capacity=capacity, timing=timing,
        record=True,
    )  # fmt: skip
    return result.token_s, result.counters, Schedule(trace.experts_TLK, result.copies, result.slot_TLK, capacity)


def comparison_row(
    run: PolicyRun, fraction: float, sim_s: np.ndarray, engine_s: np.ndarray, counters: Counters, schedule: Schedule
) -> dict:
    """One line of engine_validation.csv; the first tokens the engine spent warming up are left out of both."""
    sim_s = sim_s[len(sim_s) - len(engine_s) :]
    demand = int((schedule.copies[:, 1] == 0).sum())
    prefetch = int((schedule.copies[:, 1] == 1).sum())
    return {
        "policy": run.policy, "predictor": run.predictor, "eviction": run.eviction, "budget": run.budget,
        "lookahead": run.lookahead, "cache_fraction": fraction, "tokens": len(engine_s),
        "sim_ms_per_token": 1e3 * sim_s.mean(), "engine_ms_per_token": 1e3 * engine_s.mean(),
        "engine_over_sim": engine_s.mean() / sim_s.mean(),
        "misses": counters.misses, "prefetches": counters.prefetches, "engine_demand_copies": demand,
        "engine_prefetch_copies": prefetch,
        "counts_identical": demand == counters.misses and prefetch == counters.prefetches,
    }  # fmt: skip


def validate(cfg: DictConfig | EvaluateConfig) -> pd.DataFrame:
    cfg = to_object(cfg, EvaluateConfig)
    require_cuda()
    workdir = Workdir(cfg.workdir)
    store = TraceStore.open(workdir.traces())
    eval_cfg, sim = fitted_evaluation(cfg.eval, cfg.sim, store.manifest.sizes, str(store.root))
    cfg = dataclasses.replace(cfg, eval=eval_cfg, sim=sim)
    target = resolve_target(cfg.target, store.manifest)
    timing = TimingModel.from_profiles(cfg.hardware, target)
    gate, _ = build_heuristics(["gate_lookahead"], store, cfg.eval.seed)
    predictors = gate + load_trained_predictors(workdir.predictors, store)[0]
    check_predictor_costs(cfg.sim, [getattr(p, "kind", "") for p in predictors])
    sim = cfg.sim
    trace = rank_predictions(store, cfg.eval.split, predictors, sim.max_tokens, max(sim.lookaheads), sim.ranked_experts)
    num_layers = trace.experts_TLK.shape[1]
    capacities = {f: cache_slots(f, num_layers, trace.num_experts) for f in sim.cache_fractions}
    engine = PrefetchEngine(target, num_layers, trace.num_experts, max(capacities.values()))
    rows = []
    for fraction, capacity in capacities.items():
        for run in policy_runs(trace, sim, timing, cfg.hardware.launch_us * 1e-6):
            sim_s, counters, schedule = simulate_recorded(trace, run, capacity, timing)
            engine_s = engine.run(schedule)
            rows.append(comparison_row(run, fraction, sim_s, engine_s, counters, schedule))
            log.info("%s", rows[-1])
    frame = pd.DataFrame(rows)
    out = workdir.eval() / ENGINE_VALIDATION_CSV
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    log.info("engine vs simulator written to %s", out)
    return frame


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    validate(cfg)


def cli() -> None:
    """The console script: user errors as one line on stderr (speculation/cli.py)."""
    run_console(main)


if __name__ == "__main__":
    cli()
