"""Run the simulation for ``spec-evaluate`` and write its part of the evaluation: simulation.csv, figures, tables.

Runs of one predictor that differ only in their seed (``<kind>-seed<n>``) are averaged in the report's tables
(``predictor`` shows the group); simulation.csv keeps every run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from speculation.cache.config import HardwareConfig, SimConfig, TargetConfig
from speculation.cache.plans import rank_predictions
from speculation.cache.simulation import simulate_sweep
from speculation.cache.timing import TimingModel
from speculation.io import atomic_path, atomic_write_text
from speculation.plots import cache_sweep, latency_breakdown
from speculation.predictors.base import Predictor
from speculation.predictors.trained import TrainedPredictor, seed_group
from speculation.traces import TraceStore

KEY = ["policy", "predictor", "eviction", "budget", "lookahead", "cache_fraction"]
SHOWN = ["ms_per_token", "compute_ms", "stall_ms", "hit_rate", "bytes_moved", "wasted_bytes",
         "speedup_vs_on_demand", "oracle_gain_fraction", "bound_ms"]  # fmt: skip


@dataclass
class SimulationOutput:
    frame: pd.DataFrame
    markdown: list[str]
    paths: dict[str, Path]
    stats: dict = field(default_factory=dict)


def resolve_target(target: TargetConfig, store: TraceStore) -> TargetConfig:
    return TargetConfig.from_manifest(store.manifest, target) if target.name == "traced" else target


def seed_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over the seeds of each predictor (``<kind>-seed<n>`` → ``<kind>``), with the seed count."""
    grouped = frame.assign(predictor=frame["predictor"].map(seed_group))
    table = grouped.groupby(KEY, sort=False)[SHOWN].mean()
    table["seeds"] = grouped.groupby(KEY, sort=False).size()
    return table.reset_index()


def _label(row: pd.Series) -> str:
    seeds = f" ({int(row['seeds'])} seeds)" if row["seeds"] > 1 else ""
    return f"{row['policy']} | {row['predictor']}{seeds} | {row['eviction']} | {row['budget']}"


def headline_table(table: pd.DataFrame, fraction: float, lookahead: int) -> str:
    """Every policy at one cache fraction and lookahead (prefetching ones with LRU and prediction-aware eviction;
    the oracle and on-demand with every eviction)."""
    rows = table[(table["cache_fraction"] == fraction) & table["lookahead"].isin([0, lookahead])]
    rows = rows[rows["policy"].isin(["on_demand", "oracle"]) | rows["eviction"].isin(["lru", "predicted"])]
    lines = [
        "| policy | predictor | eviction | B | ms/token | stall ms | hit rate | MB moved/token | MB wasted/token "
        "| speedup | oracle gain |",
        "|" + "---|" * 11,
    ]
    for _, row in rows.iterrows():
        gain = "" if pd.isna(row["oracle_gain_fraction"]) else f"{row['oracle_gain_fraction']:.1%}"
        lines.append(
            f"| {_label(row)} | {row['ms_per_token']:.3f} | {row['stall_ms']:.3f} | {row['hit_rate']:.3f} "
            f"| {row['bytes_moved'] / 1e6:.1f} | {row['wasted_bytes'] / 1e6:.1f} "
            f"| {row['speedup_vs_on_demand']:.2f}x | {gain} |"
        )
    return "\n".join(lines)


def _ms(rows: pd.DataFrame, policy: str, eviction: str, lookahead: int) -> float:
    row = rows[(rows["policy"] == policy) & (rows["eviction"] == eviction) & (rows["lookahead"] == lookahead)]
    return float(row["ms_per_token"].iloc[0]) if len(row) else float("nan")


def bounds_table(table: pd.DataFrame, lookahead: int) -> str:
    """Per cache fraction: pure compute, on-demand LRU, the computed bounds and the oracle."""
    lines = [
        "| cache | pure compute | on-demand LRU | bound: on-demand Belady | bound: overlap "
        f"| oracle LRU (d={lookahead}) | oracle Belady (d={lookahead}) |",
        "|" + "---|" * 7,
    ]
    for fraction, rows in table.groupby("cache_fraction"):
        lines.append(
            f"| {fraction:.1%} | {rows['compute_ms'].min():.3f} | {_ms(rows, 'on_demand', 'lru', 0):.3f} "
            f"| {_ms(rows, 'on_demand', 'belady', 0):.3f} | {rows['bound_ms'].min():.3f} "
            f"| {_ms(rows, 'oracle', 'lru', lookahead):.3f} | {_ms(rows, 'oracle', 'belady', lookahead):.3f} |"
        )
    return "\n".join(lines)


def sweep_table(table: pd.DataFrame, lookahead: int, eviction: str = "lru") -> str:
    """ms/token (speedup) of every policy across cache fractions, at one lookahead and eviction."""
    rows = table[(table["eviction"] == eviction) & table["lookahead"].isin([0, lookahead])]
    fractions = sorted(rows["cache_fraction"].unique())
    lines = ["| policy | predictor | eviction | B | " + " | ".join(f"{f:.1%}" for f in fractions) + " |",
             "|" + "---|" * (4 + len(fractions))]  # fmt: skip
    for _, group in rows.groupby(["policy", "predictor", "budget"], sort=False):
        cells = group.set_index("cache_fraction")
        values = [
            f"{cells.loc[f, 'ms_per_token']:.3f} ({cells.loc[f, 'speedup_vs_on_demand']:.2f}x)" for f in fractions
        ]
        lines.append(f"| {_label(group.iloc[0])} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def equal_bytes_table(table: pd.DataFrame, fraction: float, lookahead: int, eviction: str = "lru") -> str:
    """The confidence-driven budget against the fixed top-B budgets at the same bytes moved.

    A predictor's fixed budgets B = 0 (on demand), 1, 2, ... trace a bytes-vs-latency curve; mixing two adjacent
    budgets token by token moves any amount of bytes in between at (about) the interpolated latency. The confidence
    rule beats the fixed budgets when its latency is below that curve at its own bytes.
    """
    rows = table[(table["cache_fraction"] == fraction) & (table["eviction"] == eviction)]
    on_demand = rows[rows["policy"] == "on_demand"]
    lines = ["| predictor | confidence: ms/token | MB moved/token | fixed top-B at equal MB: ms/token | difference |",
             "|---|---|---|---|---|"]  # fmt: skip
    for predictor, own in rows[rows["lookahead"] == lookahead].groupby("predictor", sort=False):
        confident = own[own["policy"] == "predictor_confidence"]
        fixed = pd.concat([on_demand, own[own["policy"] == "predictor_topb"]]).sort_values("bytes_moved")
        if confident.empty or len(fixed) < 2:
            continue
        mb, ms = confident["bytes_moved"].item(), confident["ms_per_token"].item()
        frontier = float(np.interp(mb, fixed["bytes_moved"], fixed["ms_per_token"]))
        lines.append(f"| {predictor} | {ms:.4f} | {mb / 1e6:.2f} | {frontier:.4f} | {ms - frontier:+.4f} |")
    return "\n".join(lines)


def simulate_and_report(
    store: TraceStore,
    methods: Sequence[Predictor],
    split: str,
    sim: SimConfig,
    hardware: HardwareConfig,
    target: TargetConfig,
    eval_dir: Path,
) -> SimulationOutput:
    """Replay the split under every policy; write simulation.csv and the figures; return the report's section."""
    target = resolve_target(target, store)
    timing = TimingModel.from_profiles(hardware, target)
    predictors = [m for m in methods if m.name == "gate_lookahead" or isinstance(m, TrainedPredictor)]
    trace = rank_predictions(store, split, predictors, sim.max_tokens, max(sim.lookaheads), max(sim.budgets))
    labels = {"hardware": hardware.name, "target": target.name}
    frame, stats = simulate_sweep(trace, sim, timing, hardware.launch_us * 1e-6, labels)
    stats = {**stats, "timing": asdict(timing), "target": asdict(target), "hardware": asdict(hardware)}
    eval_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(eval_dir / "simulation.csv") as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_text(eval_dir / "simulation.json", json.dumps(stats, indent=2))

    table = seed_groups(frame)
    fraction = min(sim.cache_fractions, key=lambda f: abs(f - sim.headline_fraction))
    lookahead = min(sim.lookaheads, key=lambda d: abs(d - sim.headline_lookahead))
    figures = eval_dir / "figures"
    paths = {
        "simulation_csv": eval_dir / "simulation.csv",
        "latency_breakdown": latency_breakdown(table, fraction, lookahead, figures / "latency_breakdown.png"),
        "cache_sweep": cache_sweep(table, lookahead, figures / "cache_sweep.png"),
    }
    markdown = [
        f"## Prefetch simulation: {target.name} experts on {hardware.name}",
        "",
        f"{stats['runs']} replays of the split's first {int(frame['tokens'].iloc[0]):,} tokens as one batch-1 decode "
        f"stream ({stats['events_per_s'] / 1e6:.1f} M layer-events/s). "
        f"One expert = {target.expert_bytes / 1e6:.2f} MB; "
        f"copy {timing.copy_s * 1e6:.0f} µs, expert FFN {timing.expert_s * 1e6:.1f} µs, rest of a MoE layer "
        f"{timing.non_expert_s * 1e6:.1f} µs, LM head {timing.head_s * 1e6:.1f} µs. Speedup: vs on-demand LRU at the "
        "same cache size; oracle gain: the share of the oracle's gain (same eviction, same lookahead) a policy gets. "
        "Learned predictors' rows average their seeds.",
        "",
        "### Bounds (ms/token)",
        "",
        "On-demand Belady bounds every on-demand policy; the overlap bound (max of pure compute and the fewest loads "
        "any schedule needs, times one copy) bounds every policy. The oracle prefetches the router's real choice at "
        "the same issue times as the predictors and, knowing the future, skips a prefetch whose victim is needed "
        "sooner; with Belady eviction a top-2 predictor can still beat it by loading experts later tokens need.",
        "",
        bounds_table(table, lookahead),
        "",
        f"### Cache {fraction:.0%} of all experts, lookahead {lookahead}",
        "",
        headline_table(table, fraction, lookahead),
        "",
        f"### Confidence-driven vs fixed budgets at equal bytes (cache {fraction:.0%}, lookahead {lookahead}, LRU)",
        "",
        equal_bytes_table(table, fraction, lookahead),
        "",
        f"### ms/token (speedup) across cache sizes, lookahead {lookahead}, LRU eviction",
        "",
        sweep_table(table, lookahead),
        "",
    ]
    return SimulationOutput(frame, markdown, paths, stats)
