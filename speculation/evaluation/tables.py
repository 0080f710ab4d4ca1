"""The evaluation's tables as DataFrames of metrics.csv's frame: what report.md shows and what notebooks analyse.

Every function takes the frame of :func:`read_metrics` (or ``spec-evaluate``'s own) and returns a new DataFrame;
nothing is re-derived anywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from speculation.config.stages import seed_group
from speculation.errors import MissingInputError, UserError
from speculation.workdir import METRICS_CSV, METRICS_JSON

BOUNDS = ("random", "oracle")  # chance and perfect
PRIORS = ("frequency", "previous_token")
HEURISTICS = ("layer_minus_1", "multi_layer", "pattern", "adaptive")
ROLES = {"random": "bound: chance", "oracle": "bound: perfect", **dict.fromkeys(PRIORS, "prior"),
         **dict.fromkeys(HEURISTICS, "heuristic"), "gate_lookahead": "router baseline"}  # fmt: skip
METRICS = ["top1_acc", "top1_ci_low", "top1_ci_high", "recall_at_budget", "exact_set", "f1", "kl", "ece", "brier",
           "conf_corr", "change_rate", "miss_share", "miss_top1_acc", "miss_recall_at_budget"]  # fmt: skip


def read_metrics(eval_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """metrics.csv (``layer`` a nullable integer, empty in ``pooled`` rows) and metrics.json of an evaluation."""
    if not (eval_dir / METRICS_CSV).is_file() or not (eval_dir / METRICS_JSON).is_file():
        raise MissingInputError(
            f"no evaluation in {eval_dir}; run spec-evaluate for its workdir (or spec-pipeline experiment=smoke)."
        )
    frame = pd.read_csv(eval_dir / METRICS_CSV, dtype={"layer": "Int64", "seeds": int, "run": str})
    if "pooled" not in frame:  # metrics.csv before the pooled flag marked pooled rows with layer "all"
        raise UserError(f"{eval_dir / METRICS_CSV} predates the current columns; rerun spec-evaluate for its workdir.")
    return frame, json.loads((eval_dir / METRICS_JSON).read_text())


def role(method: str) -> str:
    """What a method is in the tables: a bound, a prior, a heuristic, the router baseline, or trained."""
    return ROLES.get(method, "trained")


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows pooled over source layers."""
    return frame[frame["pooled"]]


def per_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of single source layers, ``layer`` as an int."""
    return frame[~frame["pooled"]].astype({"layer": int})


def labels(rows: pd.DataFrame) -> list[str]:
    """How the report and figures name each row's method: a seed mean as ``"<group> (n seeds)"``."""
    return [f"{m} ({n} seeds)" if n > 1 else m for m, n in zip(rows["method"], rows["seeds"], strict=True)]


def lookahead_table(frame: pd.DataFrame, lookahead: int) -> pd.DataFrame:
    """One row per method at lookahead ``d``: every pooled metric (the report's table for that lookahead)."""
    rows = aggregate(frame)
    return rows[rows["lookahead"] == lookahead][["method", "seeds", *METRICS]].reset_index(drop=True)


def representatives(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` without the single runs of a seed group that has a mean row: a "best method" is then chosen among
    seed means and lone runs, never by picking the luckiest seed."""
    averaged = set(rows.loc[rows["seeds"] > 1, "method"])
    return rows[~((rows["seeds"] == 1) & rows["method"].map(seed_group).isin(averaged) & (rows["role"] == "trained"))]


def summary(
    frame: pd.DataFrame, metrics: tuple[str, ...] = ("top1_acc", "recall_at_budget", "kl", "ece")
) -> pd.DataFrame:
    """Methods (rows, in metrics.csv order, indexed by role and label) × (metric, lookahead) columns."""
    rows = aggregate(frame)
    rows = rows.assign(method=labels(rows))
    methods = list(dict.fromkeys(rows["method"]))
    table = pd.concat(
        {metric: rows.pivot(index="method", columns="lookahead", values=metric) for metric in metrics},
        axis=1,
        names=["metric", "d"],
    ).reindex(methods)
    table.index = pd.MultiIndex.from_arrays([[role(m) for m in methods], methods], names=["role", "method"])
    return table


def gap_closed(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of the random → oracle top-1 gap each method closes, per lookahead (0 = chance, 1 = perfect)."""
    rows = aggregate(frame)
    top1 = rows.pivot(index="method", columns="lookahead", values="top1_acc").reindex(dict.fromkeys(rows["method"]))
    missing = [m for m in BOUNDS if m not in top1.index]
    if missing:
        raise UserError(f"{missing} were not evaluated: add them to eval.methods to normalise by the bounds.")
    return (top1 - top1.loc["random"]) / (top1.loc["oracle"] - top1.loc["random"])


def reliability_frame(reliability: dict[str, dict]) -> pd.DataFrame:
    """metrics.json's reliability bins, long: method, lookahead, bin, count, confidence, accuracy, share."""
    bins = pd.concat({key: pd.DataFrame(value) for key, value in reliability.items()}, names=["key", "bin"])
    bins = bins.reset_index()
    bins[["method", "lookahead"]] = bins["key"].str.extract(r"^(.*)/d(\d+)$")
    bins = bins.astype({"lookahead": int}).drop(columns="key")
    bins["share"] = bins["count"] / bins.groupby(["method", "lookahead"])["count"].transform("sum").clip(lower=1)
    return bins


def calibration(frame: pd.DataFrame, reliability: dict[str, dict], lookahead: int) -> pd.DataFrame:
    """Per method at one lookahead: top-1, ECE, Brier, Spearman and the mean confidence against the accuracy
    (``overconfidence`` = mean confidence − top-1; positive: over-confident)."""
    bins = reliability_frame(reliability)
    bins = bins[bins["lookahead"] == lookahead]
    mass = (bins["count"] * bins["confidence"].fillna(0)).groupby(bins["method"]).sum()
    mean_confidence = mass / bins.groupby("method")["count"].sum()
    table = lookahead_table(frame, lookahead).set_index("method")[["top1_acc", "ece", "brier", "conf_corr"]]
    table["mean_confidence"] = mean_confidence
    table["overconfidence"] = table["mean_confidence"] - table["top1_acc"]
    return table


def hardest_layers(frame: pd.DataFrame) -> pd.DataFrame:
    """Per lookahead, the source layer where the best non-bound method is weakest (what any prefetcher built from
    these methods reaches there), the median of the methods there, and the easiest layer."""
    rows = per_layer(frame)
    rows = rows[~rows["method"].isin(BOUNDS)]
    best = rows.loc[rows.groupby(["lookahead", "layer"])["top1_acc"].idxmax()].set_index(["lookahead", "layer"])
    by_layer = pd.DataFrame(
        {
            "source_layer": best["source_layer"],
            "target_layer": best["target_layer"],
            "best_top1": best["top1_acc"],
            "best_method": best["method"],
            "median_top1": rows.groupby(["lookahead", "layer"])["top1_acc"].median(),
        }
    ).reset_index()
    hardest = by_layer.loc[by_layer.groupby("lookahead")["best_top1"].idxmin()].set_index("lookahead")
    easiest = by_layer.loc[by_layer.groupby("lookahead")["best_top1"].idxmax()].set_index("lookahead")
    return hardest.drop(columns="layer").assign(
        easiest_source_layer=easiest["source_layer"],
        easiest_best_top1=easiest["best_top1"],
        layers=by_layer.groupby("lookahead").size(),
    )


def best_of(frame: pd.DataFrame, methods: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per lookahead, the pooled row of the method among ``methods`` with the highest top-1 (NaN where none);
    ``label`` names it as the report does."""
    rows = aggregate(frame)
    rows = rows.assign(label=labels(rows))
    lookaheads = sorted(rows["lookahead"].unique())
    rows = rows[rows["method"].isin(methods)].dropna(subset=["top1_acc"])
    return rows.loc[rows.groupby("lookahead")["top1_acc"].idxmax()].set_index("lookahead").reindex(lookaheads)


def gains(frame: pd.DataFrame) -> pd.DataFrame:
    """Per lookahead: the best non-oracle method (a seed group by its mean, never its best seed) and its top-1 /
    recall margins over gate_lookahead, the best simple heuristic, previous_token and frequency; ``cis_disjoint``:
    its top-1 interval lies above the best heuristic's."""
    methods = [m for m in dict.fromkeys(representatives(aggregate(frame))["method"]) if m != "oracle"]
    best = best_of(frame, methods)
    references = {
        "gate_lookahead": best_of(frame, ["gate_lookahead"]),
        "best heuristic": best_of(frame, HEURISTICS),
        "previous_token": best_of(frame, ["previous_token"]),
        "frequency": best_of(frame, ["frequency"]),
    }
    table = pd.DataFrame(
        {
            "best_method": best["label"],
            "top1_acc": best["top1_acc"],
            "top1_ci_low": best["top1_ci_low"],
            "top1_ci_high": best["top1_ci_high"],
            "recall_at_budget": best["recall_at_budget"],
            "miss_top1_acc": best["miss_top1_acc"],
            "best_heuristic": references["best heuristic"]["method"],
            "heuristic_top1": references["best heuristic"]["top1_acc"],
        }
    )
    for name, reference in references.items():
        table[f"top1 vs {name}"] = best["top1_acc"] - reference["top1_acc"]
        table[f"recall vs {name}"] = best["recall_at_budget"] - reference["recall_at_budget"]
    table["cis_disjoint"] = best["top1_ci_low"] > references["best heuristic"]["top1_ci_high"]
    return table.rename_axis("d")
