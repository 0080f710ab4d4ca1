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
# trained predictor) against the router's real decision at layer `l + d`. A prefetcher that predicts d layers
# ahead has d layers' compute to hide each expert's transfer, so the question is how much accuracy each method
# keeps as d grows. Every table here is a function of `speculation.evaluation.tables` on `eval/metrics.csv`, every
# figure one of `speculation.plots`, the same ones `report.md` is made of:
#
# 1. **Aggregate table** — top-1, recall, KL and ECE per method and lookahead, between the random (chance) and
#    oracle (perfect) bounds, and the share of the gap between them each method closes.
# 2. **Accuracy vs lookahead** — how quickly each method decays with the prefetch distance.
# 3. **Calibration** — whether a method's confidence can decide how many experts to prefetch.
# 4. **Per-layer breakdown** — which source layers are hard to predict from.
# 5. **Gain over the best heuristic** — what the best method buys over the cheap rules it has to beat.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`) and `SPEC_LOOKAHEAD` (default `1`), the lookahead of the
# calibration section. Metric definitions and units: `docs/metrics.md`.

# %%
import os

import pandas as pd
from IPython.display import display

from speculation.evaluation import tables
from speculation.notebooks import show_figures_inline, workdir_from_env
from speculation.plots import accuracy_vs_lookahead, layer_accuracy_heatmap, reliability_diagrams

show_figures_inline()  # the library's figures render inline
workdir = workdir_from_env()  # $SPEC_WORKDIR, default outputs/smoke
frame, summary = tables.read_metrics(workdir.eval())
methods = list(dict.fromkeys(frame["method"]))
lookaheads = sorted(frame["lookahead"].unique())
pd.set_option("display.float_format", "{:.3f}".format)
print(f"{workdir.root}: model {summary['model']!r}, {summary['tokens']:,} tokens, prefetch budget "
      f"{summary['prefetch_budget']}; methods {', '.join(f'{m} ({tables.role(m)})' for m in methods)}")  # fmt: skip
if summary["skipped_methods"]:
    display(pd.Series(summary["skipped_methods"], name="not evaluated, because"))

# %% [markdown]
# ## 1. Aggregate table
#
# **Top-1**: is the single most likely expert right (what a budget-1 prefetcher loads)? **recall@budget**: the
# share of the router's selected experts inside the top-budget, the hit rate of a prefetcher loading that many.
# **KL**(router ‖ predictor), in nats, scores the whole distribution; **ECE** says whether the confidence can be
# trusted to size the budget. Below: the share of the random → oracle top-1 gap each method closes (0 = chance,
# 1 = perfect), which normalises away the number of experts.

# %%
display(tables.summary(frame))
tables.gap_closed(frame).rename_axis(columns="d").style.format("{:.1%}").background_gradient(cmap="viridis", axis=None)

# %% [markdown]
# ## 2. Accuracy vs lookahead
#
# A method whose curve stays flat can prefetch deep; one that falls to the frequency prior by d = 2 only buys a
# single layer of transfer time. Bands are the 95 % document-bootstrap intervals of top-1 (seed rows: t-intervals
# over seeds).

# %%
accuracy_vs_lookahead(tables.aggregate(frame), summary["prefetch_budget"])

# %% [markdown]
# ## 3. Calibration
#
# A variable-budget prefetcher loads experts until the predicted mass is high enough, so the confidence has to mean
# what it says. Bars are the top-1 accuracy of the tokens in each confidence bin, the outline the bin's share of
# tokens; a calibrated method sits on the diagonal. `overconfidence` = mean confidence − top-1 (positive: the
# prefetcher would load too little); `conf_corr` (Spearman) says whether confidence at least ranks tokens.

# %%
d = int(os.environ.get("SPEC_LOOKAHEAD", "1"))
if d not in lookaheads:
    raise ValueError(f"SPEC_LOOKAHEAD={d} was not evaluated; choose one of {lookaheads}")
calibration = tables.calibration(frame, summary["reliability"], d)
display(reliability_diagrams(summary["reliability"], methods, d, calibration["ece"].to_dict()))
calibration

# %% [markdown]
# ## 4. Per-layer breakdown
#
# Top-1 by method and source layer l (where the prediction is made) for target layer l + d. A layer that is hard
# for every method deserves a larger budget (or cache); an easy one can prefetch just the top-1. The table names,
# per lookahead, the source layer where the *best* non-bound method is weakest.

# %%
for lookahead in lookaheads:
    display(layer_accuracy_heatmap(tables.per_layer(frame), lookahead))
tables.hardest_layers(frame)

# %% [markdown]
# ## 5. Gain over the best heuristic
#
# A learned or router-based predictor costs compute and memory on the critical path; it is only worth it if it
# beats the rules that cost nothing. Per lookahead: the best non-oracle method and its margins over the best simple
# heuristic, previous_token and frequency. `cis_disjoint` compares the two top-1 intervals: a conservative check,
# since both are scored on the same documents.

# %%
tables.gains(frame)
