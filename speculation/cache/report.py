"""The simulation step of ``spec-evaluate``: replay the split under every policy (:func:`simulate`), then its part
of the evaluation: simulation.csv, simulation.json, figures (:func:`write_simulation`) and report.md's sections
(:func:`markdown_sections`), rendered from the DataFrames of :mod:`speculation.cache.tables`.

Runs of one predictor that differ only in their seed (``<kind>-seed<n>``) are averaged in the report's tables
(``predictor`` shows the group); simulation.csv keeps every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from speculation.cache import tables
from speculation.cache.plans import rank_predictions
from speculation.cache.simulation import simulate_sweep
from speculation.cache.timing import TimingModel, resolve_target
from speculation.config.simulate import HardwareConfig, SimConfig, TargetConfig
from speculation.io import atomic_path, atomic_write_json
from speculation.markdown import to_markdown
from speculation.plots import cache_sweep, latency_breakdown
from speculation.predictors.base import Predictor
from speculation.predictors.trained import TrainedPredictor, kind_of
from speculation.traces import TraceStore
from speculation.workdir import SIMULATION_CSV, SIMULATION_JSON


@dataclass
class Simulation:
    """One sweep's results: simulation.csv's rows, the seed-averaged table, and what produced them."""

    frame: pd.DataFrame  # every replay (simulation.csv)
    table: pd.DataFrame  # seeds of a predictor averaged (tables.seed_groups)
    stats: dict  # replays, layer-events/s, and the timing, target and hardware profiles (simulation.json)
    timing: TimingModel
    target: TargetConfig
    hardware: HardwareConfig
    fraction: float  # the headline cache fraction
    lookahead: int  # the headline lookahead


def simulate(
    store: TraceStore,
    methods: Sequence[Predictor],
    split: str,
    sim: SimConfig,
    hardware: HardwareConfig,
    target: TargetConfig,
    identity: dict[str, Any] | None = None,
) -> Simulation:
    """Replay ``split``'s first tokens under every policy ``sim`` asks for; writes nothing.

    ``identity``: columns put first in every row (metrics.csv's identity: the traces, split and workdir), so
    simulation.csv joins metrics.csv and files of several workdirs concatenate."""
    target = resolve_target(target, store.manifest)
    timing = TimingModel.from_profiles(hardware, target)
    predictors = [m for m in methods if m.name == "gate_lookahead" or isinstance(m, TrainedPredictor)]
    trace = rank_predictions(store, split, predictors, sim.max_tokens, max(sim.lookaheads), sim.ranked_experts)
    labels = {"hardware": hardware.name, "target": target.name}
    frame, stats = simulate_sweep(trace, sim, timing, hardware.launch_us * 1e-6, labels)
    kinds = {m.name: kind_of(m) for m in predictors}
    frame.insert(frame.columns.get_loc("predictor") + 1, "predictor_kind", frame["predictor"].map(kinds))
    frame = pd.concat([pd.DataFrame(identity or {}, index=frame.index), frame], axis=1)
    stats = {
        **stats,
        "timing": asdict(timing),
        "target": asdict(target),
        "hardware": asdict(hardware),
        "headline_fraction": sim.headline_cache_fraction,  # what spec-compare reads as this run's headline
        "headline_lookahead": sim.headline_lookahead,
    }
    return Simulation(
        frame, tables.seed_groups(frame), stats, timing, target, hardware, sim.headline_cache_fraction,
        sim.headline_lookahead,
    )  # fmt: skip


def figures(simulation: Simulation) -> dict[str, Figure]:
    table, fraction, lookahead = simulation.table, simulation.fraction, simulation.lookahead
    return {
        "latency_breakdown": latency_breakdown(table, fraction, lookahead),
        "cache_sweep": cache_sweep(tables.sweep_lines(table, fraction, lookahead), fraction, lookahead),
    }


def write_simulation(eval_dir: Path, simulation: Simulation) -> dict[str, Path]:
    """simulation.csv and simulation.json under ``eval_dir``."""
    with atomic_path(eval_dir / SIMULATION_CSV) as tmp:
        simulation.frame.to_csv(tmp, index=False)
    atomic_write_json(eval_dir / SIMULATION_JSON, simulation.stats)
    return {"simulation_csv": eval_dir / SIMULATION_CSV, "simulation_json": eval_dir / SIMULATION_JSON}


def _run_columns(rows: pd.DataFrame) -> dict[str, pd.Series | list]:
    return {
        "policy": list(rows["policy"]),
        "predictor": [tables.predictor_label(row) for _, row in rows.iterrows()],
        "eviction": list(rows["eviction"]),
        "B": list(rows["budget"]),
    }


def render_headline(rows: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            **_run_columns(rows),
            "ms/token": list(rows["ms_per_token"]),
            "stall ms": list(rows["stall_ms_per_token"]),
            "hit rate": list(rows["hit_rate"]),
            "MB moved/token": list(rows["bytes_moved_per_token"] / 1e6),
            "MB wasted/token": list(rows["wasted_bytes_per_token"] / 1e6),
            "speedup": list(rows["speedup_vs_on_demand"]),
            "oracle gain": list(rows["oracle_gain_fraction"]),
        }
    )
    formats = {"ms/token": "{:.3f}", "stall ms": "{:.3f}", "hit rate": "{:.3f}", "MB moved/token": "{:.1f}",
               "MB wasted/token": "{:.1f}", "speedup": "{:.2f}x", "oracle gain": "{:.1%}"}  # fmt: skip
    return to_markdown(shown, formats)


def render_bounds(bounds: pd.DataFrame, lookahead: int) -> str:
    shown = bounds.rename(
        columns={
            "cache_fraction": "cache",
            "pure_compute": "pure compute",
            "on_demand_lru": "on-demand LRU",
            "bound_on_demand_belady": "bound: on-demand Belady",
            "bound_overlap": "bound: overlap",
            "oracle_lru": f"oracle LRU (d={lookahead})",
            "oracle_belady": f"oracle Belady (d={lookahead})",
        }
    )
    return to_markdown(shown, {"cache": "{:.1%}", **dict.fromkeys(shown.columns[1:], "{:.3f}")})


def render_sweep(ms: pd.DataFrame, speedup: pd.DataFrame) -> str:
    shown = pd.DataFrame(_run_columns(ms.index.to_frame(index=False)))
    for fraction in ms.columns:
        shown[f"{fraction:.1%}"] = [f"{a:.3f} ({b:.2f}x)" for a, b in zip(ms[fraction], speedup[fraction], strict=True)]
    return to_markdown(shown)


def render_equal_bytes(frame: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "predictor": frame["predictor"],
            "confidence: ms/token": frame["confidence_ms"],
            "MB moved/token": frame["bytes_moved_per_token"] / 1e6,
            "fixed top-B at equal MB: ms/token": frame["fixed_ms_at_equal_bytes"],
            "difference": frame["difference_ms"],
        }
    )
    formats = {"confidence: ms/token": "{:.4f}", "MB moved/token": "{:.2f}",
               "fixed top-B at equal MB: ms/token": "{:.4f}", "difference": "{:+.4f}"}  # fmt: skip
    return to_markdown(shown, formats)


def latency_note(stats: dict) -> str:
    latency = stats.get("predictor_latency_us", {})
    shown = ", ".join(f"{name} {us:.1f} µs" for name, us in latency.items()) or "none replayed"
    source = stats.get("predictor_profile")
    return shown + (f" (learned: measured, {source})" if source else " (learned: sim.predictor_us)")


def headline_sentence(simulation: Simulation) -> list[str]:
    """The simulation's line in the report's opening: the best realizable policy at the headline cell against
    on-demand and the oracle (:func:`tables.headline_numbers`, the one owner of those numbers)."""
    numbers = tables.headline_numbers(simulation.table, simulation.fraction, simulation.lookahead)
    return [f"What it buys ({simulation.target.name} experts on {simulation.hardware.name}, cache "
            f"{simulation.fraction:.0%} of all experts, lookahead {simulation.lookahead}, batch-1 decode): the best "
            f"realizable policy, **{numbers['best_policy']}**, takes {numbers['best_ms_per_token']:.3f} ms/token "
            f"against {numbers['on_demand_lru_ms_per_token']:.3f} on demand (LRU), "
            f"**{numbers['best_speedup_vs_on_demand']:.2f}x**, and gets "
            f"**{numbers['best_oracle_gain_fraction']:.0%} of the oracle's gain** (the oracle with the same "
            f"eviction takes {numbers['best_eviction_oracle_ms_per_token']:.3f} ms/token; with LRU, "
            f"{numbers['oracle_lru_ms_per_token']:.3f}).", ""]  # fmt: skip


def markdown_sections(simulation: Simulation) -> list[str]:
    """report.md's prefetch-simulation part."""
    table, fraction, lookahead = simulation.table, simulation.fraction, simulation.lookahead
    timing, target, stats = simulation.timing, simulation.target, simulation.stats
    return [
        f"## Prefetch simulation: {target.name} experts on {simulation.hardware.name}",
        "",
        f"{stats['runs']} replays of the split's first {int(simulation.frame['tokens'].iloc[0]):,} tokens as one "
        f"batch-1 decode stream ({stats['events_per_s'] / 1e6:.1f} M layer-events/s). "
        f"One expert = {target.expert_bytes / 1e6:.2f} MB; "
        f"copy {timing.copy_s * 1e6:.0f} µs, expert FFN {timing.expert_s * 1e6:.1f} µs, rest of a MoE layer "
        f"{timing.non_expert_s * 1e6:.1f} µs, LM head {timing.head_s * 1e6:.1f} µs. Speedup: vs on-demand LRU at the "
        "same cache size; oracle gain: the share of the oracle's gain (same eviction, same lookahead) a policy gets. "
        "Learned predictors' rows average their seeds. "
        f"Predictor latency per step (side stream, delays its copies): {latency_note(stats)}.",
        "",
        "### Bounds (ms/token)",
        "",
        "On-demand Belady bounds every on-demand policy; the overlap bound (max of pure compute and the fewest loads "
        "any schedule needs, times one copy) bounds every policy. The oracle prefetches the router's real choice at "
        "the same issue times as the predictors and, knowing the future, skips a prefetch whose victim is needed "
        "sooner; with Belady eviction a top-2 predictor can still beat it by loading experts later tokens need.",
        "",
        render_bounds(tables.bounds(table, lookahead), lookahead),
        "",
        f"### Cache {fraction:.0%} of all experts, lookahead {lookahead}",
        "",
        render_headline(tables.headline(table, fraction, lookahead)),
        "",
        f"### Confidence-driven vs fixed budgets at equal bytes (cache {fraction:.0%}, lookahead {lookahead}, LRU)",
        "",
        render_equal_bytes(tables.equal_bytes(table, fraction, lookahead)),
        "",
        f"### ms/token (speedup) across cache sizes, lookahead {lookahead}, LRU eviction",
        "",
        render_sweep(tables.sweep(table, lookahead), tables.sweep(table, lookahead, column="speedup_vs_on_demand")),
        "",
    ]
