"""The evaluation's files: metrics.csv's frame (with seed means), metrics.json, the figures and report.md's sections.

The tables the report shows are the DataFrames of :mod:`speculation.evaluation.tables`, rendered to markdown here
(:mod:`speculation.markdown`), so a notebook calls the same functions instead of re-deriving them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from speculation.environment import describe
from speculation.evaluation import tables
from speculation.evaluation.runner import EvaluationResult
from speculation.evaluation.tables import aggregate, lookahead_table, per_layer
from speculation.io import atomic_path, atomic_write_json
from speculation.markdown import to_markdown
from speculation.plots import accuracy_vs_lookahead, layer_accuracy_heatmap, reliability_diagrams
from speculation.traces.analysis import IDENTITY_COLUMNS
from speculation.workdir import METRICS_CSV, METRICS_JSON

# metrics.csv's columns, in order: what the traces are (the same in every row of a file, so files concatenate and
# join), what the row is, then the metrics (docs/metrics.md defines each with its unit).
IDENTITY = [*IDENTITY_COLUMNS, "split", "workdir"]
KEYS = ["method", "kind", "role", "run", "seeds", "lookahead", "pooled", "layer", "source_layer", "target_layer"]
METRICS = [*tables.METRICS, "n_tokens", "n_docs"]
COLUMNS = IDENTITY + KEYS + METRICS


def metrics_frame(result: EvaluationResult, kinds: dict[str, str], identity: dict[str, Any]) -> pd.DataFrame:
    """metrics.csv as a DataFrame, one row per (method, lookahead, source layer) and per (method, lookahead)
    pooled over layers (``pooled``, ``layer`` empty), ordered as ``kinds`` (method name -> its predictor kind, or
    its own name for a heuristic or baseline), then lookahead, then layer (pooled last).

    ``identity``: :data:`IDENTITY`'s values (the traces', the split, the workdir)."""
    frame = pd.DataFrame(result.rows)
    frame["kind"] = frame["method"].map(kinds)
    frame["role"] = frame["method"].map(tables.role)
    frame["run"] = frame["method"].where(frame["role"] == "trained")  # the run directory under predictors/
    frame["seeds"] = 1
    frame = frame.assign(**{column: identity[column] for column in IDENTITY})[COLUMNS]
    frame["_method"] = frame["method"].map({m: i for i, m in enumerate(kinds)})
    frame["_layer"] = frame["layer"].fillna(10**6)
    frame = frame.sort_values(["_method", "lookahead", "_layer"]).drop(columns=["_method", "_layer"])
    return frame.astype({"layer": "Int64"}).reset_index(drop=True)


def seed_means(frame: pd.DataFrame, groups: dict[str, str]) -> pd.DataFrame:
    """Rows for every group of ≥ 2 runs that differ only in their seed: ``method`` the group's name, ``seeds`` the
    number of runs, ``run`` empty.

    Each metric is the mean over seeds; the top-1 interval is mean ± t(0.975, n-1) · sd / sqrt(n) across seeds
    (the seed-to-seed spread, not the document bootstrap of one run).
    """
    members: dict[str, list[str]] = {}
    for method, group in groups.items():
        members.setdefault(group, []).append(method)
    rows = []
    for group, methods in members.items():
        if len(methods) < 2:
            continue
        runs = frame[frame["method"].isin(methods)]
        for _, cell in runs.groupby(["lookahead", "pooled", "layer"], sort=False, dropna=False):
            first = cell.iloc[0]
            row = {**first[IDENTITY + KEYS].to_dict(), "method": group, "run": None, "seeds": len(cell),
                   **cell[METRICS].mean().to_dict()}  # fmt: skip
            spread = stats.t.ppf(0.975, len(cell) - 1) * cell["top1_acc"].std(ddof=1) / np.sqrt(len(cell))
            row["top1_ci_low"], row["top1_ci_high"] = row["top1_acc"] - spread, row["top1_acc"] + spread
            rows.append(row)
    if not rows:
        return frame
    return pd.concat([frame, pd.DataFrame(rows, columns=COLUMNS).astype(frame.dtypes)], ignore_index=True)


def with_interval(row: Any) -> str:
    """``0.847 [0.838, 0.856]``; the value alone where there is no interval (``eval.bootstrap=0``)."""
    if np.isnan(row.top1_ci_low) or np.isnan(row.top1_ci_high):
        return f"{row.top1_acc:.3f}"
    return f"{row.top1_acc:.3f} [{row.top1_ci_low:.3f}, {row.top1_ci_high:.3f}]"


def render_lookahead_table(table: pd.DataFrame, budget: int) -> str:
    shown = pd.DataFrame(
        {
            "method": tables.labels(table),
            "top-1 [95 % CI]": [with_interval(row) for row in table.itertuples()],
            f"recall@{budget}": table["recall_at_budget"],
            "top-1 on misses": table["miss_top1_acc"],
            f"recall@{budget} on misses": table["miss_recall_at_budget"],
            **{label: table[column] for column, label in _SHOWN.items()},
        }
    )
    numbers = [f"recall@{budget}", "top-1 on misses", f"recall@{budget} on misses", *_SHOWN.values()]
    return to_markdown(shown, dict.fromkeys(numbers, "{:.3f}"))


_SHOWN = {"exact_set": "exact set", "f1": "F1", "kl": "KL (nats)", "ece": "ECE", "brier": "Brier",
          "conf_corr": "conf. corr.", "change_rate": "change rate"}  # fmt: skip


def figures(frame: pd.DataFrame, result: EvaluationResult, budget: int) -> dict[str, Figure]:
    """The evaluation's figures by name (saved as ``figures/<name>.png``)."""
    methods = list(dict.fromkeys(frame.loc[frame["seeds"] == 1, "method"]))  # seed means have no reliability bins
    ece = lookahead_table(frame, 1).set_index("method")["ece"].to_dict()
    return {
        "accuracy_vs_lookahead": accuracy_vs_lookahead(_labelled(aggregate(frame)), budget),
        "reliability_d1": reliability_diagrams(result.reliability, methods, 1, ece),
        "layer_accuracy_d1": layer_accuracy_heatmap(_labelled(per_layer(frame)), 1),
    }


def _labelled(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(method=tables.labels(rows))  # the figures' legends name seed means as the tables do


def read_first(frame: pd.DataFrame, budget: int) -> list[str]:
    """The prediction part of the report's opening: per lookahead, the best method (a seed group by its mean) and
    its top-1 margin over gate_lookahead (the untrained router baseline) and over the best simple heuristic."""
    best = tables.gains(frame)
    shown = pd.DataFrame(
        {
            "d": best.index,
            "best method": best["best_method"],
            "top-1 [95 % CI]": [with_interval(r) for r in best.itertuples()],
            "top-1 on misses": best["miss_top1_acc"],
            f"recall@{budget}": best["recall_at_budget"],
            "vs gate_lookahead": best["top1 vs gate_lookahead"],
            "vs best heuristic": best["top1 vs best heuristic"],
            "best heuristic": best["best_heuristic"],
        }
    )
    formats = {"top-1 on misses": "{:.3f}", f"recall@{budget}": "{:.3f}", "vs gate_lookahead": "{:+.3f}",
               "vs best heuristic": "{:+.3f}"}  # fmt: skip
    return ["Best predictor per lookahead (held-out split; the margins are differences in top-1 accuracy):", "",
            to_markdown(shown, formats), ""]  # fmt: skip


# What each column of the per-lookahead tables is, with its unit (docs/metrics.md holds the formulas).
COLUMN_DEFINITIONS = {
    "top-1 [95 % CI]": "share of tokens whose most likely predicted expert is the router's first choice (fraction); "
    "interval: see the header",
    "recall@B": "share of the router's chosen experts among the B likeliest predicted ones (fraction)",
    "top-1 on misses, recall@B on misses": "the same on the would-be misses only (fraction)",
    "exact set": "the predicted top-|S| equals the router's set S (fraction)",
    "F1": "overlap of the predicted top-K and S, for routers that pick a variable number of experts (fraction)",
    "KL (nats)": "KL(router distribution ‖ predicted distribution) per token, natural log",
    "ECE": "expected calibration error of the top-1 confidence over 15 equal-width bins (fraction)",
    "Brier": "mean squared error of the top-1 confidence against top-1 correctness (fraction²)",
    "conf. corr.": "Spearman correlation of the top-1 confidence with top-1 correctness ([-1, 1])",
    "change rate": "share of tokens whose predicted top-1 differs from the previous token's in the sequence (fraction; "
    "lower means fewer cache changes)",
}


def column_section(budget: int) -> list[str]:
    """report.md's column glossary for the prediction tables."""
    return ["## Columns", "", *[f"- **{name.replace('@B', f'@{budget}')}**: {text}."
                                for name, text in COLUMN_DEFINITIONS.items()],
            "", "Formulas, token sets and intervals: `docs/metrics.md` in the repository.", ""]  # fmt: skip


def domain_section(frame: pd.DataFrame, domains: dict[str, str]) -> list[str]:
    """In-domain vs out-of-domain top-1 of the trained predictors, when any was trained on another corpus."""
    if "out" not in domains.values():
        return []
    pooled = aggregate(frame)
    shown = pooled[pooled["method"].isin(list(domains))].pivot_table(
        index="method", columns="lookahead", values="top1_acc", sort=False
    )
    label = {"in": "in domain", "out": "out of domain", "unknown": "unknown"}
    table = pd.DataFrame({"predictor": shown.index, "trained on": [label[domains[m]] for m in shown.index]})
    for d in shown.columns:
        table[f"top-1, d = {d}"] = list(shown[d])
    table = table.sort_values("trained on", kind="stable")
    formats = {c: "{:.3f}" for c in table.columns if c.startswith("top-1")}
    return ["## In domain vs out of domain", "",
            "Predictors trained on traces of this corpus (in) and of another corpus traced from the same model "
            "(out; `model.source_workdir`).", "", to_markdown(table, formats), ""]  # fmt: skip


# Below this many held-out documents a document bootstrap resamples too few units for its interval to say much.
MIN_DOCUMENTS_FOR_INTERVALS = 20


def bootstrap_wording(resamples: int) -> str:
    if resamples == 0:
        return "none (eval.bootstrap=0 skips the bootstrap)"
    return f"the 95 % bootstrap over documents ({resamples} resamples)"


def few_documents_warning(documents: int) -> list[str]:
    """A warning paragraph when the split has fewer than :data:`MIN_DOCUMENTS_FOR_INTERVALS` documents."""
    if documents >= MIN_DOCUMENTS_FOR_INTERVALS:
        return []
    plural = "s" * (documents != 1)
    return [
        f"**Warning: only {documents} held-out document{plural}.** The top-1 intervals resample whole documents, so "
        f"with fewer than {MIN_DOCUMENTS_FOR_INTERVALS} they understate the spread (a few long documents dominate). "
        "Trace more documents (`trace.max_tokens_per_split`, `corpus.test_fraction`, or a corpus of more, shorter "
        "files) before reading them as uncertainty.",
        "",
    ]


def provenance(context: dict[str, Any]) -> list[str]:
    """Which corpus and which code, libraries and machine made these numbers (metrics.json holds the fields)."""
    lines = []
    corpus = context.get("corpus")
    if corpus:
        lines.append(f"Traced corpus: `{corpus['kind']}`, {corpus['documents']:,} documents, fingerprint "
                     f"`{corpus['fingerprint'][:16]}`.")  # fmt: skip
    if context.get("environment"):
        lines.append(f"Made by {describe(context['environment'])}.")
    return [" ".join(lines), ""] if lines else []


def markdown_sections(
    frame: pd.DataFrame, result: EvaluationResult, context: dict[str, Any], budget: int, headline: list[str]
) -> list[str]:
    """report.md's prediction-quality part: its answer first (the best predictor per lookahead, then ``headline``,
    the simulation's sentence), the setting, one table per lookahead, the columns, what was not evaluated."""
    lines = [
        f"# Routing prediction: {context['model']} ({context['split']} split, {context['stack']} stack)",
        "",
        "## Read this first",
        "",
        *read_first(frame, budget),
        *headline,
        *few_documents_warning(context["documents"]),
        "## Setting",
        "",
        f"{result.tokens:,} tokens from {context['documents']} held-out documents; every number is per token against "
        "the router's real decision at layer l + d, pooled over source layers l. Top-1 intervals: for a single run "
        f'or baseline, {bootstrap_wording(context["bootstrap"])}; for an "n seeds" row '
        "(the mean of n runs that differ only in their seed), mean ± t(0.975, n − 1) · sd / √n over the seeds, "
        f"which is the seed-to-seed spread, not the documents'. Prefetch budget B = {budget}. Heuristics are fitted "
        f"on the train split only. Evaluation ran at {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s.",
        "",
        f"*Would-be misses* are the tokens whose target expert none of the previous {context['miss_window']} tokens "
        "of the sequence used at that layer: the copies a cache of recently used experts would make on demand, so "
        'the only tokens where a prefetch can save time. The "on misses" columns score those tokens alone.',
        "",
        *provenance(context),
    ]
    for d in sorted(aggregate(frame)["lookahead"].unique()):
        table = lookahead_table(frame, d)
        share = table["miss_share"].iloc[0]  # the same tokens for every method at this lookahead
        lines += [f"## Lookahead d = {d}", "", f"Would-be misses: {share:.1%} of the scored tokens.", "",
                  render_lookahead_table(table, budget), ""]  # fmt: skip
    lines += column_section(budget)
    lines += domain_section(frame, context.get("domains", {}))
    if result.skipped:
        lines += ["## Not evaluated", ""] + [f"- **{m}**: {why}" for m, why in result.skipped.items()] + [""]
    return lines


def write_metrics(
    eval_dir: Path, frame: pd.DataFrame, result: EvaluationResult, context: dict[str, Any], figure_paths: dict
) -> dict[str, Path]:
    """metrics.csv and metrics.json under ``eval_dir`` (``figure_paths``: the figures already saved)."""
    with atomic_path(eval_dir / METRICS_CSV) as tmp:
        frame.to_csv(tmp, index=False)
    summary = {
        **context,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "skipped_methods": result.skipped,
        "rows": json.loads(frame.to_json(orient="records")),
        "reliability": result.reliability,
        "figures": {name: str(Path(path).relative_to(eval_dir)) for name, path in figure_paths.items()},
    }
    atomic_write_json(eval_dir / METRICS_JSON, summary)
    return {"metrics_csv": eval_dir / METRICS_CSV, "metrics_json": eval_dir / METRICS_JSON}
