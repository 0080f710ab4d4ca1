"""Write an evaluation's files: metrics.csv, metrics.json, report.md and the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from speculation.evaluation.runner import EvaluationResult
from speculation.io import atomic_path, atomic_write_text
from speculation.plots import accuracy_vs_lookahead, layer_accuracy_heatmap, reliability_diagrams

COLUMNS = [
    "method", "lookahead", "layer", "source_layer", "target_layer", "top1_acc", "top1_ci_low", "top1_ci_high",
    "recall_at_budget", "exact_set", "f1", "kl", "ece", "brier", "conf_corr", "stability", "n_tokens", "n_docs",
]  # fmt: skip


def metrics_frame(result: EvaluationResult, method_order: list[str]) -> pd.DataFrame:
    """metrics.csv as a DataFrame: methods in ``method_order``, then lookahead, then layer (``all`` last)."""
    frame = pd.DataFrame(result.rows)[COLUMNS]
    frame["_method"] = frame["method"].map({m: i for i, m in enumerate(method_order)})
    frame["_layer"] = frame["layer"].map(lambda v: 10**6 if v == "all" else int(v))
    return (
        frame.sort_values(["_method", "lookahead", "_layer"]).drop(columns=["_method", "_layer"]).reset_index(drop=True)
    )


def seed_means(frame: pd.DataFrame, groups: dict[str, str]) -> pd.DataFrame:
    """Rows ``"<group> (n seeds)"`` for every group of ≥ 2 runs that differ only in their seed.

    Each metric is the mean over seeds; the top-1 interval is mean ± t(0.975, n-1) · sd / sqrt(n) across seeds
    (the seed-to-seed spread, not the document bootstrap of one run).
    """
    members: dict[str, list[str]] = {}
    for method, group in groups.items():
        members.setdefault(group, []).append(method)
    rows = []
    metrics = [c for c in COLUMNS if c not in ("method", "lookahead", "layer", "source_layer", "target_layer")]
    for group, methods in members.items():
        if len(methods) < 2:
            continue
        runs = frame[frame["method"].isin(methods)]
        for (lookahead, layer), cell in runs.groupby(["lookahead", "layer"], sort=False):
            row = {"method": f"{group} ({len(cell)} seeds)", "lookahead": lookahead, "layer": layer,
                   "source_layer": cell["source_layer"].iloc[0], "target_layer": cell["target_layer"].iloc[0],
                   **cell[metrics].mean().to_dict()}  # fmt: skip
            spread = stats.t.ppf(0.975, len(cell) - 1) * cell["top1_acc"].std(ddof=1) / np.sqrt(len(cell))
            row["top1_ci_low"], row["top1_ci_high"] = row["top1_acc"] - spread, row["top1_acc"] + spread
            rows.append(row)
    return pd.concat([frame, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True) if rows else frame


def markdown_table(aggregate: pd.DataFrame, lookahead: int, budget: int) -> str:
    rows = aggregate[aggregate["lookahead"] == lookahead]
    header = (
        f"| method | top-1 [95 % CI] | recall@{budget} | exact set | F1 | KL | ECE | Brier | conf. corr. | stability |"
    )
    lines = [header, "|" + "---|" * 10]
    for _, row in rows.iterrows():
        lines.append(
            f"| {row['method']} | {row['top1_acc']:.3f} [{row['top1_ci_low']:.3f}, {row['top1_ci_high']:.3f}] "
            f"| {row['recall_at_budget']:.3f} | {row['exact_set']:.3f} | {row['f1']:.3f} | {row['kl']:.3f} "
            f"| {row['ece']:.3f} | {row['brier']:.3f} | {row['conf_corr']:.3f} | {row['stability']:.3f} |"
        )
    return "\n".join(lines)


def write_outputs(
    result: EvaluationResult,
    frame: pd.DataFrame,
    eval_dir: Path,
    context: dict[str, Any],
    budget: int,
    sections: list[str] | None = None,
    figures_extra: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Everything under ``eval_dir``; each file is written to a temporary name and renamed.

    ``sections``: markdown appended to report.md (the prefetch simulation); ``figures_extra``: its figures.
    """
    figures = eval_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    aggregate = frame[frame["layer"] == "all"]
    per_layer = frame[frame["layer"] != "all"]
    methods = list(dict.fromkeys(frame["method"]))
    paths = {
        "accuracy_vs_lookahead": accuracy_vs_lookahead(aggregate, figures / "accuracy_vs_lookahead.png", budget),
        "reliability_d1": reliability_diagrams(result.reliability, methods, 1, figures / "reliability_d1.png"),
        "layer_accuracy_d1": layer_accuracy_heatmap(per_layer, 1, figures / "layer_accuracy_d1.png"),
    }
    with atomic_path(eval_dir / "metrics.csv") as tmp:
        frame.to_csv(tmp, index=False)
    summary = {
        **context,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "skipped_methods": result.skipped,
        "rows": json.loads(frame.to_json(orient="records")),
        "reliability": result.reliability,
        "figures": {name: str(path.relative_to(eval_dir)) for name, path in paths.items()},
    }
    atomic_write_text(eval_dir / "metrics.json", json.dumps(summary, indent=2))
    lines = [
        f"# Routing prediction: {context['model']} ({context['split']} split, {context['stack']} stack)",
        "",
        f"{result.tokens:,} tokens from {context['documents']} held-out documents; every number is per token against "
        "the router's real decision at layer l + d, pooled over source layers l. Top-1 intervals: 95 % bootstrap over "
        f"documents ({context['bootstrap']} resamples). Prefetch budget B = {budget}. Heuristics are fitted on the "
        "train split only. Evaluation ran at "
        f"{summary['tokens_per_s']:,.0f} tokens/s.",
        "",
    ]
    for d in sorted(aggregate["lookahead"].unique()):
        lines += [f"## Lookahead d = {d}", "", markdown_table(aggregate, d, budget), ""]
    if result.skipped:
        lines += ["## Not evaluated", ""] + [f"- **{m}**: {why}" for m, why in result.skipped.items()] + [""]
    lines += sections or []
    figures_all = {**paths, **{k: v for k, v in (figures_extra or {}).items() if v.suffix == ".png"}}
    lines += ["## Figures", ""] + [f"![{name}]({path.relative_to(eval_dir)})" for name, path in figures_all.items()]
    atomic_write_text(eval_dir / "report.md", "\n".join(lines) + "\n")
    return {"metrics_csv": eval_dir / "metrics.csv", "report": eval_dir / "report.md", **paths, **(figures_extra or {})}
