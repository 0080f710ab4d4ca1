"""The simulation's tables as DataFrames: what report.md shows and what notebooks analyse, computed once.

Every function takes the seed-averaged table of :func:`seed_groups` (or simulation.csv's frame for it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speculation.config.stages import seed_group
from speculation.errors import MissingInputError
from speculation.workdir import SIMULATION_CSV, SIMULATION_JSON

KEY = ["policy", "predictor", "eviction", "budget", "lookahead", "cache_fraction"]
SHOWN = ["ms_per_token", "compute_ms_per_token", "stall_ms_per_token", "hit_rate", "bytes_moved_per_token",
         "wasted_bytes_per_token", "speedup_vs_on_demand", "oracle_gain_fraction", "bound_ms_per_token"]  # fmt: skip


def read_simulation(eval_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """simulation.csv (empty predictor names kept as "") and simulation.json of an evaluation."""
    if not (eval_dir / SIMULATION_CSV).is_file():
        raise MissingInputError(
            f"no simulation in {eval_dir}; run spec-evaluate with sim.enabled=true for its workdir."
        )
    frame = pd.read_csv(eval_dir / SIMULATION_CSV, keep_default_na=False, na_values=[""])
    frame["predictor"] = frame["predictor"].fillna("")
    return frame, json.loads((eval_dir / SIMULATION_JSON).read_text())


def seed_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over the seeds of each predictor (``<kind>-seed<n>`` → ``<kind>``), with the seed count."""
    predictor = frame["predictor"].fillna("").map(seed_group)
    grouped = frame.assign(predictor=predictor)
    table = grouped.groupby(KEY, sort=False)[SHOWN].mean()
    table["seeds"] = grouped.groupby(KEY, sort=False).size()
    return table.reset_index()


def predictor_label(row: pd.Series) -> str:
    """The predictor's name in the report, with its seed count when its rows average several runs."""
    return f"{row['predictor']} ({int(row['seeds'])} seeds)" if row["seeds"] > 1 else row["predictor"]


def headline(table: pd.DataFrame, fraction: float, lookahead: int) -> pd.DataFrame:
    """Every policy at one cache fraction and lookahead (prefetching ones with LRU and the two prediction-aware
    evictions; the oracle and on-demand with every eviction)."""
    rows = table[(table["cache_fraction"] == fraction) & table["lookahead"].isin([0, lookahead])]
    return rows[rows["policy"].isin(["on_demand", "oracle"]) | rows["eviction"].isin(["lru", "predicted", "expected"])]


def best_policy(table: pd.DataFrame, fraction: float, lookahead: int) -> pd.Series:
    """The fastest realizable row of :func:`headline`: the oracle and Belady eviction know the future, so they are
    bounds, not candidates."""
    rows = headline(table, fraction, lookahead)
    rows = rows[(rows["policy"] != "oracle") & (rows["eviction"] != "belady")]
    return rows.loc[rows["ms_per_token"].idxmin()]


def policy_label(row: pd.Series) -> str:
    """``cost_aware_multi/transformer (3 seeds)/expected/B2``: policy, predictor, eviction, budget of one row."""
    parts = [row["policy"]]
    if row["predictor"]:
        parts.append(predictor_label(row))
    parts.append(row["eviction"])
    if row["policy"] not in ("on_demand", "oracle"):
        parts.append(f"B{int(row['budget'])}")
    return "/".join(str(part) for part in parts)


def headline_numbers(table: pd.DataFrame, fraction: float, lookahead: int) -> dict[str, float | str]:
    """The simulation's headline as flat numbers (W&B summaries, ``spec-compare``): the best realizable policy's
    label, ms/token, speedup over on-demand LRU and share of the oracle's gain (against the oracle with the best
    policy's own eviction, as ``oracle_gain_fraction`` is), with on-demand's and the oracle's ms/token (LRU, and
    the oracle's with that eviction) at the same cache fraction and lookahead."""
    best = best_policy(table, fraction, lookahead)
    at = table[table["cache_fraction"] == fraction]
    on_demand = ms_of(at, "on_demand", "lru", 0)
    oracle = ms_of(at, "oracle", str(best["eviction"]), lookahead)
    return {
        "cache_fraction": fraction,
        "lookahead": lookahead,
        "best_policy": policy_label(best),
        "best_ms_per_token": float(best["ms_per_token"]),
        "best_speedup_vs_on_demand": float(best["speedup_vs_on_demand"]),
        # the row's own oracle_gain_fraction, except that an on-demand row (lookahead 0) has no oracle of its
        # lookahead: it is measured against the headline lookahead's, like every other candidate
        "best_oracle_gain_fraction": (on_demand - float(best["ms_per_token"])) / (on_demand - oracle),
        "on_demand_lru_ms_per_token": on_demand,
        "oracle_lru_ms_per_token": ms_of(at, "oracle", "lru", lookahead),
        "best_eviction_oracle_ms_per_token": oracle,
    }


def ms_of(rows: pd.DataFrame, policy: str, eviction: str, lookahead: int) -> float:
    """ms/token of one (policy, eviction, lookahead) among ``rows`` (NaN if it was not simulated)."""
    row = rows[(rows["policy"] == policy) & (rows["eviction"] == eviction) & (rows["lookahead"] == lookahead)]
    return float(row["ms_per_token"].iloc[0]) if len(row) else float("nan")


def bounds(table: pd.DataFrame, lookahead: int) -> pd.DataFrame:
    """Per cache fraction: pure compute, on-demand LRU, the computed bounds and the oracle (ms/token)."""
    return pd.DataFrame(
        [
            {
                "cache_fraction": fraction,
                "pure_compute": rows["compute_ms_per_token"].min(),
                "on_demand_lru": ms_of(rows, "on_demand", "lru", 0),
                "bound_on_demand_belady": ms_of(rows, "on_demand", "belady", 0),
                "bound_overlap": rows["bound_ms_per_token"].min(),
                "oracle_lru": ms_of(rows, "oracle", "lru", lookahead),
                "oracle_belady": ms_of(rows, "oracle", "belady", lookahead),
            }
            for fraction, rows in table.groupby("cache_fraction")
        ]
    )


RUN = ["policy", "predictor", "seeds", "eviction", "budget"]  # what names one policy's row across cache sizes


def sweep(table: pd.DataFrame, lookahead: int, eviction: str = "lru", column: str = "ms_per_token") -> pd.DataFrame:
    """``column`` of every policy (rows: ``RUN``) across cache fractions (columns), at one lookahead and eviction."""
    rows = table[(table["eviction"] == eviction) & table["lookahead"].isin([0, lookahead])]
    return rows.pivot_table(index=RUN, columns="cache_fraction", values=column, sort=False)


def sweep_lines(table: pd.DataFrame, fraction: float, lookahead: int) -> pd.DataFrame:
    """The cache-size figure's lines: for each policy, the one configuration (predictor, eviction, budget) that is
    fastest at the headline ``fraction`` and ``lookahead``, over every cache fraction, with a ``label`` column
    (:func:`policy_label`); and on-demand LRU, the speedups' reference. Belady eviction knows the future, so it is
    no candidate (the oracle's own future knowledge is the point of that line)."""
    rows = table[table["lookahead"].isin([0, lookahead]) & (table["eviction"] != "belady")]
    at = rows[rows["cache_fraction"] == fraction]
    chosen = [at.loc[group["ms_per_token"].idxmin(), RUN] for _, group in at.groupby("policy", sort=False)]
    chosen += [at[(at["policy"] == "on_demand") & (at["eviction"] == "lru")][RUN].squeeze()]
    keys = pd.DataFrame(chosen).drop_duplicates()
    lines = rows.merge(keys, on=RUN).sort_values("cache_fraction")
    return lines.assign(label=lines.apply(policy_label, axis=1))


def equal_bytes(table: pd.DataFrame, fraction: float, lookahead: int, eviction: str = "lru") -> pd.DataFrame:
    """The confidence-driven budget against the fixed top-B budgets at the same bytes moved.

    A predictor's fixed budgets 0 (on demand), 1, 2, ... trace a bytes-vs-latency curve; mixing two adjacent
    budgets token by token moves any amount of bytes in between at (about) the interpolated latency. The confidence
    rule beats the fixed budgets when its latency is below that curve at its own bytes.
    """
    rows = table[(table["cache_fraction"] == fraction) & (table["eviction"] == eviction)]
    on_demand = rows[rows["policy"] == "on_demand"]
    out = []
    for predictor, own in rows[rows["lookahead"] == lookahead].groupby("predictor", sort=False):
        confident = own[own["policy"] == "predictor_confidence"]
        fixed = pd.concat([on_demand, own[own["policy"] == "predictor_topb"]]).sort_values("bytes_moved_per_token")
        if confident.empty or len(fixed) < 2:
            continue
        mb, ms = confident["bytes_moved_per_token"].item(), confident["ms_per_token"].item()
        frontier = float(np.interp(mb, fixed["bytes_moved_per_token"], fixed["ms_per_token"]))
        out.append({"predictor": predictor, "confidence_ms": ms, "bytes_moved_per_token": mb,
                    "fixed_ms_at_equal_bytes": frontier,
                    "difference_ms": ms - frontier})  # fmt: skip
    return pd.DataFrame(out, columns=["predictor", "confidence_ms", "bytes_moved_per_token", "fixed_ms_at_equal_bytes",
                                      "difference_ms"])  # fmt: skip


def by_lookahead(table: pd.DataFrame, fraction: float, eviction: str = "lru") -> pd.DataFrame:
    """Speedup over on-demand LRU of every prefetching policy at one cache size, per lookahead (columns)."""
    rows = table[(table["cache_fraction"] == fraction) & (table["lookahead"] > 0) & (table["eviction"] == eviction)]
    return rows.pivot_table(index=["policy", "predictor", "budget"], columns="lookahead",
                            values="speedup_vs_on_demand", sort=False)  # fmt: skip
