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
# # 01 — Routing traces: what is there to predict?
#
# Before training any predictor of future routing, look at the raw traces written by `spec-collect`. Each
# section asks one question whose answer bounds what expert prefetching can gain; every table comes from
# `speculation.traces.analysis`, the figure from `speculation.plots`:
#
# 1. **Model and splits** — which model was traced, its geometry, how many tokens per split, and whether the
#    source model learned anything (val loss vs a unigram model).
# 2. **Router health** — how skewed each layer's load is. A skewed layer is cheap to cache even without
#    prediction.
# 3. **Layer-to-layer transitions** — how much the expert chosen at layer `l` tells about layer `l+1`: the
#    simplest "predict ahead" baseline a learned predictor must beat.
# 4. **Router entropy** — how sure the router is. A near-uniform router is hard to predict from anything.
# 5. **Temporal locality** — how often a token reuses the previous token's expert: what an LRU cache gets for
#    free.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`, relative to the repository root) and `SPEC_SPLIT` (default
# `test`). In CI: `SPEC_WORKDIR=outputs/smoke pytest --nbmake notebooks/`. Shape letters: `docs/glossary.md`.

# %%
import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from speculation.notebooks import show_figures_inline, workdir_from_env
from speculation.plots import utilisation_heatmap
from speculation.traces import TraceStore, analysis

show_figures_inline()  # the library's figures render inline
workdir = workdir_from_env()  # $SPEC_WORKDIR, default outputs/smoke
split = os.environ.get("SPEC_SPLIT", "test")
store = TraceStore.open(workdir.traces())  # one clear error if the workdir has no traces yet
pd.set_option("display.precision", 3)
print(f"{workdir.root}, split {split!r}: {store.split(split).num_rows} tokens, {store.num_layers} MoE layers")

# %% [markdown]
# ## 1. Model and splits
#
# Geometry matters for prefetching: `bytes_per_expert` of the traced model is small, but the simulator replays the
# same routing at a target model's expert size. The source metrics are a sanity check: a source model whose val
# loss is no better than the unigram loss routes on little more than token identity.

# %%
display(analysis.model_facts(store).to_frame())
display(analysis.splits_table(store))
source = store.manifest.raw.get("source_metrics") or {}
if {"val_loss", "unigram_val_loss"} <= set(source):
    print(f"source model val loss {source['val_loss']:.3f} nats/token vs unigram {source['unigram_val_loss']:.3f}")
else:
    print("no source metrics: a pretrained HF model was traced")

# %% [markdown]
# ## 2. Router health
#
# Load per expert and layer counted from this split's stored routing (`speculation.health`, the accumulator
# `spec-collect` writes `summary.json` with). `load_balance_score` is the effective number of experts over E
# (1 = balanced, 1/E = collapsed). A skewed layer means a small cache of its hot experts already hits often, so
# prediction matters most on the balanced layers.

# %%
health = analysis.split_health(store, split)
display(utilisation_heatmap(health.expert_load_matrix(), store.layer_names, title=f"expert load ({split})"))
analysis.health_table(health)

# %% [markdown]
# ## 3. Layer-to-layer transitions
#
# P(top-1 at layer l+1 | top-1 at layer l). A sharp (near-permutation) matrix means the current layer's expert
# alone says what to prefetch next; rows that all look like the next layer's load say nothing beyond the prior.
# The table scores the frequency prior and the most likely next expert given the current one, both fitted on
# `train` and scored here (honest held-out baselines), the same rule fitted here (an optimistic bound for a lookup
# table), and the same-id rate (expert ids are not aligned across layers: it should sit near chance).

# %%
matrices = analysis.transition_probs(store, split)
fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices), 3.4), squeeze=False, layout="constrained")
for ax, (layer, probs_EE) in zip(axes[0], enumerate(matrices), strict=True):
    image = ax.imshow(probs_EE, cmap="magma", vmin=0, vmax=1)
    ax.set(title=f"{store.layer_names[layer]} → {store.layer_names[layer + 1]}", xlabel="next", ylabel="current")
fig.colorbar(image, ax=axes[0].tolist(), label="P(next | current)", shrink=0.8)
plt.show()
analysis.transition_table(store, split)

# %% [markdown]
# ## 4. Router entropy
#
# Per-token entropy of the router's distribution over ln E (0 = one expert gets everything, 1 = uniform). A router
# near 1 barely prefers its choice, so its top-1 flips on small changes of the hidden state: a prefetcher facing it
# should spend its budget on several candidates rather than one.

# %%
entropy_NL = analysis.normalised_entropy(store, split)
fig, ax = plt.subplots(figsize=(1.5 + 1.4 * store.num_layers, 3.0), layout="constrained")
ax.violinplot([entropy_NL[:, layer] for layer in range(store.num_layers)], showmedians=True)
ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1, label="uniform router")
ax.set(xticks=range(1, store.num_layers + 1), xticklabels=store.layer_names, ylabel="entropy / ln E")
ax.legend(loc="lower right", fontsize=8)
plt.show()
analysis.entropy_table(store, split)

# %% [markdown]
# ## 5. Temporal locality
#
# How often a token's top-1 equals the previous token's in the same traced sequence: the previous-token baseline,
# and what a cache keeps for free between decode steps. Chance is Σ f_i², the match rate of two independent draws
# from the layer's load f; repeats above chance are locality a predictor can exploit.

# %%
temporal = analysis.temporal_table(store, split)
temporal[["repeat_rate", "chance"]].plot.bar(figsize=(1.5 + 1.4 * store.num_layers, 3.0), ylim=(0, 1), rot=0)
plt.show()
temporal
