# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Predictor comparison: how far ahead can we guess the router?
#
# `spec-evaluate` scores every routing predictor (baselines, heuristics, the gate-lookahead baseline and any
# trained predictor) against the router's real decision at layer `l + d`, for lookaheads d = 1, 2, ... A
# prefetcher that predicts d layers ahead has d layers' compute time to hide each expert's transfer, so the
# question is how much accuracy each method keeps as d grows. Each section reads the evaluation from one angle:
#
# 1. **Aggregate table** — top-1 with its 95 % CI, recall@B, KL and ECE per method and lookahead, between the
#    random (chance) and oracle (perfect) bounds.
# 2. **Accuracy vs lookahead** — how quickly each method decays with the prefetch distance.
# 3. **Calibration** — whether a method's confidence can decide how many experts to prefetch.
# 4. **Per-layer breakdown** — which source layers are hard to predict from.
# 5. **Gain over the best heuristic** — what the best method buys over the cheap rules it has to beat.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`, relative to the repository root), whose `eval/metrics.csv` and
# `eval/metrics.json` are the only files read, and `SPEC_LOOKAHEAD` (default `1`), the lookahead of the
# calibration section. In CI: `SPEC_WORKDIR=outputs/smoke pytest --nbmake notebooks/`.
#
# Metric definitions: `speculation/evaluation/metrics.py`. Every number is per token, then averaged; `layer ==
# "all"` rows pool the source layers.

# %%
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from speculation.notebooks import workdir_from_env

workdir = workdir_from_env()  # $SPEC_WORKDIR, default outputs/smoke
eval_dir = workdir / "eval"
if not (eval_dir / "metrics.csv").is_file() or not (eval_dir / "metrics.json").is_file():
    raise FileNotFoundError(
        f"no evaluation in {eval_dir}; set SPEC_WORKDIR to an evaluated workdir, or create one with "
        f"`spec-pipeline experiment=smoke workdir={workdir}`"
    )

# `layer` mixes source-layer indices and "all": read it as text so "all" rows are selected by string.
metrics = pd.read_csv(eval_dir / "metrics.csv", dtype={"layer": str})
summary = json.loads((eval_dir / "metrics.json").read_text())
budget = summary["prefetch_budget"]
methods = list(dict.fromkeys(metrics["method"]))  # metrics.csv order: random first, oracle last
lookaheads = sorted(metrics["lookahead"].unique().tolist())

# Roles decide line styles and which rows count as bounds, priors or heuristics below; any method not named
# here is a trained predictor.
BOUNDS = ("random", "oracle")
PRIORS = ("frequency", "previous_token")
SIMPLE_HEURISTICS = ("layer_minus_1", "multi_layer", "pattern", "adaptive")
ROLES = {
    "random": "bound: chance",
    "oracle": "bound: perfect",
    **dict.fromkeys(PRIORS, "prior"),
    **dict.fromkeys(SIMPLE_HEURISTICS, "heuristic"),
    "gate_lookahead": "router baseline",
}
role = {method: ROLES.get(method, "trained") for method in methods}
# Bounds are grey everywhere; the others cycle through tab10 without its grey, so no method looks like a bound.
palette = [plt.cm.tab10(i) for i in range(10) if i != 7]
predictor_names = [m for m in methods if m not in BOUNDS]
colors = {
    **{method: palette[i % len(palette)] for i, method in enumerate(predictor_names)},
    **dict.fromkeys(BOUNDS, "0.5"),
}

aggregate = metrics[metrics["layer"] == "all"].copy()
per_layer = metrics[metrics["layer"] != "all"].astype({"layer": int})
pd.set_option("display.float_format", "{:.3f}".format)  # fixed point: KL and margins span decades
print(
    f"{workdir}: model {summary.get('model')!r}, {summary.get('tokens', 0):,} tokens scored at "
    f"{summary.get('tokens_per_s', float('nan')):,.0f} tokens/s; prefetch budget B = {budget}"
)
print(f"methods: {', '.join(f'{m} ({role[m]})' for m in methods)}; lookaheads d = {lookaheads}")
if summary.get("skipped_methods"):
    print("not evaluated:", json.dumps(summary["skipped_methods"], indent=1))

# %% [markdown]
# ## 1. Aggregate table
#
# One row per method (in `metrics.csv` order), one column block per metric and lookahead d, pooled over source
# layers. **Top-1** says whether the single most likely expert is right: the one a budget-1 prefetcher would
# load. **recall@B** is the share of the router's selected experts inside the predictor's top-B, i.e. the hit
# rate of a prefetcher that loads B experts per token and layer. **KL**(router ‖ predictor) scores the whole
# distribution, which matters once the budget adapts to the prediction; **ECE** says whether the confidence can
# be trusted for that. The random row is the floor (top-1 ≈ 1/E, recall ≈ B/E) and the oracle the ceiling: it
# is the router's own distribution wherever that ranks the router's choice first, so its KL is ~0 too (it moves
# mass onto the choice only where capacity, group limits or biased scores overrule the distribution).

# %%
aggregate["top-1 [95 % CI]"] = (
    aggregate["top1_acc"].map("{:.3f}".format)
    + " ["
    + aggregate["top1_ci_low"].map("{:.3f}".format)
    + ", "
    + aggregate["top1_ci_high"].map("{:.3f}".format)
    + "]"
)
table_columns = {"top-1 [95 % CI]": "top-1 [95 % CI]", "recall_at_budget": f"recall@{budget}", "kl": "KL", "ece": "ECE"}
# One pivot per metric keeps each block's dtype (the top-1 block is text, the others float).
aggregate_table = pd.concat(
    {
        label: aggregate.pivot(index="method", columns="lookahead", values=column)
        for column, label in table_columns.items()
    },
    axis=1,
    names=["metric", "d"],
).reindex(methods)
aggregate_table.index = pd.MultiIndex.from_arrays([[role[m] for m in methods], methods], names=["role", "method"])
display(aggregate_table)

# %% [markdown]
# Where each method sits between the bounds: the share of the random → oracle top-1 gap it closes (0 = chance,
# 1 = perfect). This normalises away the number of experts, so lookaheads and models compare directly.

# %%
top1_MD = aggregate.pivot(index="method", columns="lookahead", values="top1_acc").reindex(methods)
if {"random", "oracle"} <= set(methods):
    gap_closed = (top1_MD - top1_MD.loc["random"]) / (top1_MD.loc["oracle"] - top1_MD.loc["random"])
    display(gap_closed.rename_axis(columns="d").style.format("{:.1%}").background_gradient(cmap="viridis", axis=None))
else:
    print("random or oracle was not evaluated: no bounds to normalise by")

# %% [markdown]
# ## 2. Accuracy vs lookahead
#
# The further ahead a prediction is made, the more time there is to move an expert's weights, and the less the
# current hidden state says about the target layer. A method whose curve stays flat can prefetch deep; one that
# falls to the frequency prior by d = 2 only buys a single layer of transfer time. Shaded bands are the 95 %
# document-bootstrap intervals of top-1; the bounds are dashed grey.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True, layout="constrained")
for method, rows in aggregate.groupby("method", sort=False):
    rows = rows.sort_values("lookahead")
    style = (
        {"color": colors[method], "linestyle": "--", "linewidth": 1, "marker": "^" if method == "oracle" else "v"}
        if method in BOUNDS
        else {"color": colors[method], "marker": "o", "linewidth": 1.2 if method in PRIORS + SIMPLE_HEURISTICS else 2.2}
    )
    axes[0].plot(rows["lookahead"], rows["top1_acc"], label=method, **style)
    axes[0].fill_between(rows["lookahead"], rows["top1_ci_low"], rows["top1_ci_high"], color=style["color"], alpha=0.15)
    axes[1].plot(rows["lookahead"], rows["recall_at_budget"], label=method, **style)
axes[0].set_ylabel("top-1 accuracy (95 % CI over documents)")
axes[1].set_ylabel(f"recall@{budget}")
for ax in axes:
    ax.set(xlabel="lookahead d (layers ahead)", xticks=lookaheads, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.suptitle("accuracy vs prefetch distance")
plt.show()

# %% [markdown]
# ## 3. Calibration
#
# A prefetcher with a variable budget loads experts until the predicted probability mass is high enough, so the
# confidence has to mean what it says. Each panel is a reliability diagram (15 equal-width confidence bins from
# `metrics.json`): bars are the top-1 accuracy of the tokens in a bin, the black outline the share of tokens in
# it, and a calibrated method sits on the diagonal. Bars below it are over-confident (the prefetcher would load
# too little), bars above it under-confident (it would waste bandwidth). ECE is the token-weighted gap; the Brier
# score also rewards sharpness, so a method can have low ECE yet a poor Brier score by always being unsure.

# %%
calibration_lookahead = int(os.environ.get("SPEC_LOOKAHEAD", "1"))
if calibration_lookahead not in lookaheads:
    raise ValueError(f"SPEC_LOOKAHEAD={calibration_lookahead} was not evaluated; choose one of {lookaheads}")

bins = pd.concat(
    {key: pd.DataFrame(value) for key, value in summary["reliability"].items()}, names=["key", "bin"]
).reset_index()
bins[["method", "lookahead"]] = bins["key"].str.extract(r"^(.*)/d(\d+)$")
bins = bins.astype({"lookahead": int})
num_bins = bins["bin"].max() + 1
bins["center"] = (bins["bin"] + 0.5) / num_bins
bins["share"] = bins["count"] / bins.groupby("key")["count"].transform("sum").clip(lower=1)
bins_at_d = bins[bins["lookahead"] == calibration_lookahead]
calibrated_methods = [m for m in methods if m in set(bins_at_d["method"])]

columns = min(len(calibrated_methods), 5)
rows_needed = int(np.ceil(len(calibrated_methods) / columns))
fig, axes = plt.subplots(
    rows_needed,
    columns,
    figsize=(2.8 * columns, 2.8 * rows_needed),
    squeeze=False,
    sharex=True,
    sharey=True,
    layout="constrained",
)
ece_at_d = aggregate[aggregate["lookahead"] == calibration_lookahead].set_index("method")["ece"]
for ax, method in zip(axes.flat, calibrated_methods, strict=False):
    method_bins = bins_at_d[bins_at_d["method"] == method]
    ax.bar(
        method_bins["center"],
        method_bins["accuracy"].fillna(0),
        width=1 / num_bins,
        color=colors[method],
        alpha=0.8,
        edgecolor="k",
        linewidth=0.4,
        label="accuracy",
    )
    ax.stairs(method_bins["share"], np.linspace(0, 1, num_bins + 1), color="k", linewidth=1, label="token share")
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"{method} (ECE {ece_at_d.get(method, np.nan):.3f})", fontsize=9)
for ax in list(axes.flat)[len(calibrated_methods) :]:
    ax.axis("off")
axes.flat[0].legend(fontsize=7, loc="upper left")
fig.supxlabel("confidence")
fig.supylabel("top-1 accuracy / token share")
fig.suptitle(f"reliability at lookahead d = {calibration_lookahead}")
plt.show()

# %% [markdown]
# ECE and Brier side by side, with the mean confidence (from the reliability bins) against the top-1 accuracy:
# a positive `confidence − top-1` is over-confidence. `conf_corr` (Spearman of confidence and correctness) says
# whether the confidence at least ranks tokens, which is enough for a budget rule fitted on held-out data.

# %%
bins_at_d = bins_at_d.assign(confidence_mass=bins_at_d["count"] * bins_at_d["confidence"].fillna(0))
mean_confidence = bins_at_d.groupby("method")["confidence_mass"].sum() / bins_at_d.groupby("method")["count"].sum()
calibration = (
    aggregate[aggregate["lookahead"] == calibration_lookahead]
    .set_index("method")[["top1_acc", "ece", "brier", "conf_corr"]]
    .assign(mean_confidence=mean_confidence)
)
calibration["confidence − top-1"] = calibration["mean_confidence"] - calibration["top1_acc"]

fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(calibration) + 1.4), sharey=True, layout="constrained")
positions = np.arange(len(calibration))
for ax, metric in zip(axes, ("ece", "brier"), strict=True):
    ax.barh(positions, calibration[metric], color=[colors[m] for m in calibration.index])
    ax.set(xlabel=metric.upper() if metric == "ece" else "Brier", xlim=(0, None))
    ax.grid(axis="x", alpha=0.3)
axes[0].set(yticks=positions, yticklabels=calibration.index)
axes[0].invert_yaxis()  # metrics.csv order top-down, as in the table
fig.suptitle(f"calibration at lookahead d = {calibration_lookahead} (lower is better)")
plt.show()
calibration.round(3)

# %% [markdown]
# ## 4. Per-layer breakdown
#
# Pooled numbers hide where a predictor fails. Each heatmap is top-1 accuracy by method and source layer l (the
# layer whose state the prediction is made from) for target layer l + d. A prefetcher can spend its budget
# unevenly: a layer that is hard from every method deserves a larger budget (or a larger cache), while an easy
# layer can prefetch just the top-1 expert.

# %%
layer_names = per_layer.drop_duplicates("layer").set_index("layer")["source_layer"].sort_index()
widths = [per_layer.loc[per_layer["lookahead"] == d, "layer"].nunique() for d in lookaheads]
fig, axes = plt.subplots(
    1,
    len(lookaheads),
    figsize=(0.9 * sum(widths) + 3.5, 0.38 * len(methods) + 1.6),
    sharey=True,
    squeeze=False,
    gridspec_kw={"width_ratios": widths},
    layout="constrained",
)
for ax, d in zip(axes[0], lookaheads, strict=True):
    heat = (
        per_layer[per_layer["lookahead"] == d]
        .pivot(index="method", columns="layer", values="top1_acc")
        .reindex(methods)
        .sort_index(axis=1)
    )
    top1_ML = heat.to_numpy(dtype=float)  # M methods x L source layers with a target l + d
    image = ax.imshow(top1_ML, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (row, column), value in np.ndenumerate(top1_ML):
        if not np.isnan(value):
            shade = "w" if value < 0.6 else "k"
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=shade)
    ax.set_xticks(range(heat.shape[1]), labels=layer_names[heat.columns], rotation=30, ha="right")
    ax.set(title=f"d = {d}", xlabel="source layer l")
axes[0, 0].set(yticks=range(len(methods)), yticklabels=methods)
fig.colorbar(image, ax=axes[0].tolist(), label="top-1 accuracy at layer l + d")
plt.show()

# %% [markdown]
# The hardest source layer per lookahead is the one where the *best* non-oracle method is weakest: that is what
# any prefetcher built from these methods can reach there. The median over the predictors (bounds excluded)
# shows whether the layer is hard for all of them or only lacks one good method.

# %%
predictors = per_layer[~per_layer["method"].isin(BOUNDS)]
best_at_layer = predictors.loc[predictors.groupby(["lookahead", "layer"])["top1_acc"].idxmax()].set_index(
    ["lookahead", "layer"]
)
by_layer = pd.DataFrame(
    {
        "source layer": best_at_layer["source_layer"],
        "target layer": best_at_layer["target_layer"],
        "best top-1": best_at_layer["top1_acc"],
        "best method": best_at_layer["method"],
        "median top-1": predictors.groupby(["lookahead", "layer"])["top1_acc"].median(),
    }
).reset_index()
hardest = by_layer.loc[by_layer.groupby("lookahead")["best top-1"].idxmin()].set_index("lookahead")
easiest = by_layer.loc[by_layer.groupby("lookahead")["best top-1"].idxmax()].set_index("lookahead")
hardest_table = hardest[["source layer", "target layer", "best top-1", "best method", "median top-1"]].assign(
    **{
        "easiest source layer": easiest["source layer"],
        "easiest best top-1": easiest["best top-1"],
        "layers": by_layer.groupby("lookahead").size(),
    }
)
hardest_table.rename_axis("d")

# %% [markdown]
# ## 5. Gain over the best heuristic
#
# A learned or router-based predictor costs compute and memory on the critical path; it is only worth it if it
# beats the rules that cost nothing. For each lookahead: the best non-oracle method by top-1, and its margin over
# the best simple heuristic (layer_minus_1, multi_layer, pattern, adaptive) and over the previous-token and
# frequency priors, in top-1 and in recall@B. A zero margin means that reference is itself the best method.
# `CIs disjoint` compares the two methods' document-bootstrap intervals: a conservative check, since both are
# scored on the same documents.


# %%
def best_per_lookahead(aggregate: pd.DataFrame, names: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per lookahead, the pooled row of the method among ``names`` with the highest top-1 (NaN where none)."""
    rows = aggregate[aggregate["method"].isin(names)].dropna(subset=["top1_acc"])
    best = rows.loc[rows.groupby("lookahead")["top1_acc"].idxmax()].set_index("lookahead")
    return best.reindex(lookaheads)


best = best_per_lookahead(aggregate, [m for m in methods if m != "oracle"])
references = {
    "best heuristic": best_per_lookahead(aggregate, SIMPLE_HEURISTICS),
    "previous_token": best_per_lookahead(aggregate, ["previous_token"]),
    "frequency": best_per_lookahead(aggregate, ["frequency"]),
}
gain = pd.DataFrame(
    {
        "best method": best["method"],
        "top-1": best["top1_acc"],
        f"recall@{budget}": best["recall_at_budget"],
        "best heuristic": references["best heuristic"]["method"],
        "heuristic top-1": references["best heuristic"]["top1_acc"],
    }
)
for name, reference in references.items():
    gain[f"Δ top-1 vs {name}"] = best["top1_acc"] - reference["top1_acc"]
    gain[f"Δ recall@{budget} vs {name}"] = best["recall_at_budget"] - reference["recall_at_budget"]
gain["CIs disjoint vs best heuristic"] = best["top1_ci_low"] > references["best heuristic"]["top1_ci_high"]
gain = gain.rename_axis("d")

margin_columns = [f"Δ top-1 vs {name}" for name in references]
fig, ax = plt.subplots(figsize=(6.5, 3.2), layout="constrained")
gain[margin_columns].set_axis(
    [f"d = {d}\n{method}" for d, method in zip(gain.index, gain["best method"], strict=True)]
).plot.bar(ax=ax, rot=0, color=["tab:blue", "tab:orange", "tab:green"])
ax.axhline(0, color="k", linewidth=0.8)
ax.set(ylabel="top-1 margin of the best method", title="gain of the best non-oracle method")
ax.legend(fontsize=8)
ax.grid(axis="y", alpha=0.3)
plt.show()

for d, row in gain.iterrows():
    print(
        f"d = {d}: {row['best method']} reaches top-1 {row['top-1']:.3f}, "
        f"{row['Δ top-1 vs best heuristic']:+.3f} over {row['best heuristic']} ({row['heuristic top-1']:.3f}), "
        f"{row['Δ top-1 vs previous_token']:+.3f} over previous_token, {row['Δ top-1 vs frequency']:+.3f} over "
        "frequency"
    )
gain
