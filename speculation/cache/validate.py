"""``spec-validate-engine``: replay the same trace in the real engine (CUDA) and in the simulator, side by side.

    spec-calibrate --name mygpu                                   # first: a measured profile
    spec-validate-engine workdir=outputs/default hardware=mygpu sim.max_tokens=2000 sim.lookaheads=[2]

Every policy and cache fraction of ``sim`` runs once in each; both execute one schedule (the simulator's recorded
copies), so hit / miss / prefetch counts agree by construction and the table compares per-token latency. Writes
``eval/engine_validation.csv`` under the workdir.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from speculation.cache import kernel
from speculation.cache.engine import PrefetchEngine, Schedule, require_cuda
from speculation.cache.plans import ReplayTrace, rank_predictions
from speculation.cache.report import resolve_target
from speculation.cache.simulation import PolicyRun, capacity_for, policy_runs
from speculation.cache.timing import TimingModel
from speculation.config import CONF_DIR, EvaluateConfig, to_object
from speculation.evaluation.loading import build_heuristics, load_trained_predictors
from speculation.io import atomic_path
from speculation.traces import TraceStore

log = logging.getLogger(__name__)


def simulate_recorded(trace: ReplayTrace, run: PolicyRun, capacity: int, timing: TimingModel) -> tuple:
    """The simulator's per-token seconds and counters, and the schedule the engine executes."""
    token_s, counters, copies, slot_TLK = kernel.simulate(
        trace.experts_TLK, np.ascontiguousarray(run.plan_TLB, dtype=np.int32), run.issue_layer_L, trace.num_experts,
        capacity, kernel.EVICTION_CODES[run.eviction], timing.copy_s, timing.non_expert_s, timing.expert_s,
        timing.head_s, run.predictor_s, True, run.clairvoyant,
    )  # fmt: skip
    return token_s, counters, Schedule(trace.experts_TLK, copies, slot_TLK, capacity)


def comparison_row(
    run: PolicyRun, fraction: float, sim_s: np.ndarray, engine_s: np.ndarray, counters: np.ndarray, schedule: Schedule
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
        "misses": int(counters[2]), "prefetches": int(counters[3]), "engine_demand_copies": demand,
        "engine_prefetch_copies": prefetch, "counts_identical": demand == counters[2] and prefetch == counters[3],
    }  # fmt: skip


def validate(cfg: DictConfig | EvaluateConfig) -> pd.DataFrame:
    cfg = to_object(cfg, EvaluateConfig)
    require_cuda()
    workdir = Path(cfg.workdir)
    store = TraceStore.open(workdir / "traces")
    target = resolve_target(cfg.target, store)
    timing = TimingModel.from_profiles(cfg.hardware, target)
    gate, _ = build_heuristics(["gate_lookahead"], store, cfg.eval.seed)
    predictors = gate + load_trained_predictors(workdir / "predictors", store)
    sim = cfg.sim
    trace = rank_predictions(store, cfg.eval.split, predictors, sim.max_tokens, max(sim.lookaheads), max(sim.budgets))
    num_layers, slots = trace.experts_TLK.shape[1:]
    capacities = {f: capacity_for(f, num_layers, trace.num_experts, slots) for f in sim.cache_fractions}
    engine = PrefetchEngine(target, num_layers, trace.num_experts, max(capacities.values()))
    rows = []
    for fraction, capacity in capacities.items():
        for run in policy_runs(trace, sim, timing, cfg.hardware.launch_us * 1e-6):
            sim_s, counters, schedule = simulate_recorded(trace, run, capacity, timing)
            engine_s = engine.run(schedule)
            rows.append(comparison_row(run, fraction, sim_s, engine_s, counters, schedule))
            log.info("%s", rows[-1])
    frame = pd.DataFrame(rows)
    out = workdir / "eval" / "engine_validation.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    log.info("engine vs simulator written to %s", out)
    return frame


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    validate(cfg)


if __name__ == "__main__":
    main()
