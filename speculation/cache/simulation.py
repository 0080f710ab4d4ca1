"""Sweep the simulator over policies, evictions, cache fractions and lookaheads: the rows of simulation.csv.

Every row replays the same tokens. ``speedup_vs_on_demand`` divides on-demand LRU's ms/token at the same cache
fraction by the row's; ``oracle_gain_fraction`` is the row's gain over on-demand LRU as a share of the oracle's gain
*with the same eviction and lookahead* (only the predictions differ). Bounds, computed: on-demand with Belady eviction
bounds every on-demand policy (its time is compute + its minimal misses × one copy); ``bound_ms_per_token`` bounds every
policy: max(pure compute, Belady's minimal loads × one copy), perfect overlap of the fewest copies any schedule
needs. Oracle prefetch is a policy, not a bound: the router's real choice fetched at the same issue times, skipping
any prefetch whose victim is needed sooner (it knows the future). It is never slower than a realizable policy with
its eviction rule; under Belady eviction (itself offline) a top-2 prefetcher can beat it by loading, by chance,
experts that later tokens need.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from speculation.cache.kernel import PolicyRun, replay
from speculation.cache.plans import ReplayTrace, candidate_plan, confidence_plan, no_plan, oracle_plan, topb_plan
from speculation.cache.timing import TimingModel
from speculation.config.rules import cache_slots
from speculation.config.simulate import SimConfig
from speculation.errors import UserError


def replay_row(trace: ReplayTrace, run: PolicyRun, capacity: int, timing: TimingModel) -> dict:
    """Simulate one run; its per-token figures (the simulation.csv columns that do not need other rows)."""
    result = replay(
        experts_TLK=trace.experts_TLK, num_experts=trace.num_experts, run=run, capacity=capacity, timing=timing
    )
    counted = result.counters
    tokens = len(result.token_s)
    accesses = counted.hits + counted.late + counted.misses
    loads = counted.misses + counted.prefetches
    return {
        "policy": run.policy,
        "predictor": run.predictor,
        "eviction": run.eviction,
        "budget": run.budget,
        "lookahead": run.lookahead,
        "capacity": capacity,
        "tokens": tokens,
        "ms_per_token": 1e3 * result.token_s.mean(),
        "compute_ms_per_token": 1e3 * counted.compute_s / tokens,
        "stall_ms_per_token": 1e3 * counted.stall_s / tokens,
        "hit_rate": counted.hits / accesses,
        "late_rate": counted.late / accesses,
        "miss_rate": counted.misses / accesses,
        "prefetches_per_token": counted.prefetches / tokens,
        "loads_per_token": loads / tokens,
        "bytes_moved_per_token": loads * timing.expert_bytes / tokens,
        "wasted_bytes_per_token": counted.wasted * timing.expert_bytes / tokens,
    }


def confidence_thresholds(cfg: SimConfig, timing: TimingModel, lookahead: int, slots: int) -> tuple[float, float]:
    """(low, high) of the confidence-driven budget; automatic values come from the timing model's break-even."""
    low = cfg.confidence_low if cfg.confidence_low is not None else timing.break_even_confidence(lookahead, slots)
    return low, cfg.confidence_high if cfg.confidence_high is not None else low


def predictor_costs(sim: SimConfig) -> dict[str, float] | None:
    """Seconds per learned-predictor step by model kind, from ``sim.predictor_profile`` (None: not given, every
    learned predictor costs ``sim.predictor_us``)."""
    if sim.predictor_profile is None:
        return None
    path = Path(sim.predictor_profile)
    try:
        profile = json.loads(path.read_text())
        return {kind: 1e-6 * float(entry["us_per_step_mean"]) for kind, entry in profile["predictors"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"sim.predictor_profile={path} is not a profile of benchmarks/predictor_cost_bench.py ({err!r}); "
            "write it again with that script's --out."
        ) from None


def check_predictor_costs(sim: SimConfig, kinds: Iterable[str]) -> None:
    """One error, before any work, if the profile lacks a kind of the learned predictors to replay."""
    costs = predictor_costs(sim)
    missing = sorted({kind for kind in kinds if kind} - set(costs or {})) if costs is not None else []
    if missing:
        raise UserError(
            f"sim.predictor_profile={sim.predictor_profile} has no cost for predictor kind(s) {missing} (it has "
            f"{sorted(costs)}); measure them with benchmarks/predictor_cost_bench.py --workdir WORKDIR."
        )


def method_latencies(trace: ReplayTrace, cfg: SimConfig, launch_s: float) -> dict[str, float]:
    """Seconds of one step of each replayed method, charged on the side stream before the copies it issues:
    gate-lookahead one kernel launch (the next router's small matmul on this hidden state); a learned predictor
    its kind's measured step from ``sim.predictor_profile``, else ``sim.predictor_us``."""
    costs = predictor_costs(cfg)
    return {
        name: launch_s if name == "gate_lookahead" else cfg.predictor_us * 1e-6 if costs is None else costs[kind]
        for name, kind in ((name, trace.kinds.get(name, "")) for name in trace.predictions)
    }


def _prefetch_plans(
    trace: ReplayTrace, cfg: SimConfig, timing: TimingModel, latencies: dict[str, float], lookahead: int
) -> list:
    """(policy, predictor, budget, plan, predictor latency) of every prefetching policy at one lookahead."""
    slots = trace.experts_TLK.shape[2]
    plans = []
    if "oracle" in cfg.policies:
        plans.append(("oracle", "", slots, oracle_plan(trace.experts_TLK, lookahead), 0.0))
    budget = max(cfg.budgets)
    for name, predictions in trace.predictions.items():
        if predictions.max_lookahead < lookahead:
            continue
        fixed = "gate_lookahead" if name == "gate_lookahead" else "predictor_topb"
        cost = latencies[name]
        if fixed in cfg.policies:
            plans += [(fixed, name, b, topb_plan(predictions, lookahead, b), cost) for b in cfg.budgets]
        if "predictor_confidence" in cfg.policies and name != "gate_lookahead":
            low, high = confidence_thresholds(cfg, timing, lookahead, slots)
            plans.append(("predictor_confidence", name, budget, confidence_plan(predictions, lookahead, low, high,
                                                                               budget), cost))  # fmt: skip
        for policy, multi in (("cost_aware", False), ("cost_aware_multi", True)):
            if policy in cfg.policies:
                plan = candidate_plan(predictions, lookahead, cfg.candidates, multi)
                plans.append((policy, name, budget, plan, cost))
    return plans


def policy_runs(
    trace: ReplayTrace,
    cfg: SimConfig,
    timing: TimingModel,
    launch_s: float,
    latencies: dict[str, float] | None = None,
) -> list[PolicyRun]:
    """Every (policy, predictor, eviction, budget, lookahead) the config asks for and the predictions allow.

    A plan does not depend on the eviction rule, so each is built once and shared by the runs of every eviction.
    ``latencies``: :func:`method_latencies`, when the caller has them already.
    """
    runs = []
    latencies = method_latencies(trace, cfg, launch_s) if latencies is None else latencies
    if "on_demand" in cfg.policies:
        nothing = no_plan(trace.experts_TLK)
        for eviction in cfg.evictions:
            if eviction != "predicted":  # nothing is predicted
                runs.append(PolicyRun("on_demand", "", eviction, 0, 0, nothing, 0.0))
    for lookahead in cfg.lookaheads:
        plans = _prefetch_plans(trace, cfg, timing, latencies, lookahead)
        for eviction in cfg.evictions:
            for policy, predictor, budget, plan, cost in plans:
                aware = policy.startswith("cost_aware")
                runs.append(PolicyRun(policy, predictor, eviction, budget, lookahead, plan, cost,
                                      clairvoyant=policy == "oracle", cost_aware=aware))  # fmt: skip
    return runs


def simulate_sweep(
    trace: ReplayTrace, cfg: SimConfig, timing: TimingModel, launch_s: float, labels: dict[str, str]
) -> tuple[pd.DataFrame, dict]:
    """simulation.csv as a DataFrame (``labels``: hardware and target names) and the sweep's own statistics.

    ``cfg`` fits the traces: ``speculation.config.rules`` checked it when the stage started.
    """
    num_tokens, num_layers, _ = trace.experts_TLK.shape
    latencies = method_latencies(trace, cfg, launch_s)
    runs = policy_runs(trace, cfg, timing, launch_s, latencies)
    rows, events, started = [], 0, time.perf_counter()
    for fraction in tqdm(cfg.cache_fractions, desc="simulate", unit="cache size"):
        capacity = cache_slots(fraction, num_layers, trace.num_experts)
        for run in runs:
            rows.append({**labels, "cache_fraction": fraction, **replay_row(trace, run, capacity, timing)})
            events += num_tokens * num_layers
    seconds = time.perf_counter() - started
    frame = _relative_columns(pd.DataFrame(rows), timing)
    latency_us = {name: 1e6 * s for name, s in latencies.items()}
    stats = {"runs": len(rows), "layer_events": events, "seconds": seconds, "events_per_s": events / seconds,
             "predictor_latency_us": latency_us, "predictor_profile": cfg.predictor_profile}  # fmt: skip
    return frame, stats


def _relative_columns(frame: pd.DataFrame, timing: TimingModel) -> pd.DataFrame:
    base = frame[(frame["policy"] == "on_demand") & (frame["eviction"] == "lru")].set_index("cache_fraction")
    reference = frame["cache_fraction"].map(base["ms_per_token"])
    frame["speedup_vs_on_demand"] = reference / frame["ms_per_token"]
    oracle = frame[frame["policy"] == "oracle"].set_index(["cache_fraction", "eviction", "lookahead"])["ms_per_token"]
    keys = pd.MultiIndex.from_frame(frame[["cache_fraction", "eviction", "lookahead"]])
    oracle_ms = pd.Series(oracle.reindex(keys).to_numpy(), index=frame.index)
    frame["oracle_gain_fraction"] = (reference - frame["ms_per_token"]) / (reference - oracle_ms)
    # Belady's on-demand loads are the fewest any schedule needs (prefetching or not); each completes before its
    # use, one at a time on the link, so no policy beats max(pure compute, those loads' copy time).
    belady = frame[(frame["policy"] == "on_demand") & (frame["eviction"] == "belady")].set_index("cache_fraction")
    if len(belady):
        link_ms = frame["cache_fraction"].map(belady["loads_per_token"]) * timing.copy_s * 1e3
        frame["bound_ms_per_token"] = np.maximum(frame["compute_ms_per_token"].min(), link_ms)
    else:  # sim.policies or sim.evictions left out on-demand Belady
        frame["bound_ms_per_token"] = np.nan
    return frame
