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
# section asks one question whose answer bounds what expert prefetching can gain:
#
# 1. **Manifest** — which model was traced, its geometry, how many tokens per split, and whether the source
#    model learned anything (val loss vs a unigram model).
# 2. **Expert utilisation** — how skewed each layer's load is. A skewed layer is cheap to cache even without
#    prediction.
# 3. **Layer-to-layer transitions** — how much the expert chosen at layer `l` tells us about layer `l+1`.
#    This is the simplest "predict ahead" baseline a learned predictor must beat.
# 4. **Router entropy** — how sure the router is. A near-uniform router is hard to predict from anything.
# 5. **Temporal locality** — how often a token reuses the previous token's expert, i.e. what an LRU cache
#    gets for free.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`, relative to the repository root) and `SPEC_SPLIT` (default
# `test`). In CI: `SPEC_WORKDIR=outputs/smoke pytest --nbmake notebooks/`.
#
# Shape legend: N token rows (ordered by sequence, then position), L MoE layers, K expert slots per token,
# E experts.

# %%
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from speculation.notebooks import workdir_from_env
from speculation.traces import TraceStore, routing_frame

workdir = workdir_from_env()  # $SPEC_WORKDIR, default outputs/smoke
split_name = os.environ.get("SPEC_SPLIT", "test")
if not (workdir / "traces" / "manifest.json").is_file():
    raise FileNotFoundError(
        f"no traces in {workdir / 'traces'}; set SPEC_WORKDIR to a workdir, or create one with "
        f"`spec-collect experiment=smoke workdir={workdir}`"
    )

store = TraceStore.open(workdir / "traces")
split = store.split(split_name)
manifest = store.manifest
layers = store.layer_names
num_layers, num_experts = len(layers), store.num_experts

experts_NLK = split.array("experts")
top1_NL = experts_NLK[:, :, 0].astype(np.int64)  # the router's first choice; -1 = dropped
seq_N = split.array("seq")
pd.set_option("display.precision", 3)
print(f"{workdir}, split {split_name!r}: {split.num_rows} tokens, {num_layers} MoE layers, E={num_experts}")

# %% [markdown]
# ## 1. Manifest summary
#
# The manifest records what was traced. Geometry matters for prefetching: `bytes_per_expert` of the traced
# model is small, but the simulator replays the same routing at a target model's expert size. The source
# metrics are a sanity check: a source model whose val loss is no better than the unigram loss routes on
# little more than token identity, and its routing will be easier (or more arbitrary) than a real model's.

# %%
geometry = manifest.get("geometry", {})
routing = manifest["routing"]
print(f"model: {manifest.get('model', {}).get('name')} ({manifest.get('adapter')})")
print(f"router: {json.dumps(manifest.get('router', {}), sort_keys=True)}")
display(
    pd.Series(
        {
            **{key: geometry.get(key) for key in ("num_layers", "moe_layers", "d_model", "d_ff", "vocab_size")},
            "num_experts": routing["num_experts"],
            "experts per token (K)": routing["max_experts_per_token"],
            "router layers": ", ".join(layers),
            "bytes_per_expert": geometry.get("bytes_per_expert"),
        },
        name="value",
    ).to_frame()
)
display(
    pd.DataFrame(
        {name: {"rows": entry["rows"], "shards": len(entry["shards"])} for name, entry in manifest["splits"].items()}
    ).T.rename_axis("split")
)
source = manifest.get("source_metrics") or {}
if {"val_loss", "unigram_val_loss"} <= set(source):
    gain = source["unigram_val_loss"] - source["val_loss"]
    print(
        f"source model val loss {source['val_loss']:.3f} nats/token vs unigram "
        f"{source['unigram_val_loss']:.3f}: gain {gain:+.3f} after {source.get('steps')} training steps"
    )
else:
    print("no source_metrics in the manifest (a pretrained HF model was traced)")

# %% [markdown]
# ## 2. Expert utilisation
#
# Load per expert and layer, counted from the traces (every kept slot, as `speculation.health` does), next to
# the router-health numbers `spec-collect` wrote to `summary.json`. `load_balance_score` is the effective
# number of experts over E (1 = balanced, 1/E = collapsed). A skewed layer means a small cache of its hot
# experts already hits often, so prediction matters most on the balanced layers.

# %%
frame = routing_frame(split)
kept = frame[frame["expert"] >= 0]
counts_LE = (
    kept.groupby(["layer", "expert"]).size().unstack(fill_value=0).reindex(columns=range(num_experts), fill_value=0)
)
load_LE = counts_LE.to_numpy() / np.clip(counts_LE.to_numpy().sum(axis=1, keepdims=True), 1, None)

fig, ax = plt.subplots(figsize=(1.5 + 0.6 * num_experts, 1.0 + 0.5 * num_layers), layout="constrained")
image = ax.imshow(load_LE, cmap="viridis", vmin=0, aspect="auto")
for (layer, expert), value in np.ndenumerate(load_LE):
    ax.text(
        expert,
        layer,
        f"{value:.2f}",
        ha="center",
        va="center",
        fontsize=7,
        color="w" if value < 0.5 * load_LE.max() else "k",
    )
ax.set(xticks=range(num_experts), yticks=range(num_layers), yticklabels=layers, xlabel="expert")
ax.set_title(f"expert load per layer ({split_name}; uniform = {1 / num_experts:.3f})")
fig.colorbar(image, ax=ax, label="fraction of assignments")
plt.show()

summary_path = workdir / "traces" / "summary.json"
summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
health = summary.get("splits", {}).get(split_name, {}).get("layers", {})
health_table = pd.DataFrame(
    {
        "load_balance_score": 1.0 / (num_experts * np.square(load_LE).sum(axis=1)),
        "utilisation": (load_LE > 0).mean(axis=1),
        "max_load": load_LE.max(axis=1),
    },
    index=pd.Index(layers, name="layer"),
)
if health:
    summary_table = pd.DataFrame(health).T.reindex(layers)
    health_table["summary: load_balance_score"] = summary_table["load_balance_score"].astype(float)
    health_table["summary: utilisation"] = summary_table["utilisation"].astype(float)
    health_table["summary: overflow %"] = summary_table["capacity_overflow_pct"].astype(float)
    health_table["|trace - summary| load"] = [
        np.abs(load_LE[i] - np.asarray(health[name]["expert_load"])).max() for i, name in enumerate(layers)
    ]
else:
    print(f"{summary_path} has no entry for split {split_name!r}; showing the trace-derived numbers only")
health_table

# %% [markdown]
# ## 3. Layer-to-layer transitions
#
# P(expert at layer l+1 | expert at layer l) for the router's first choice, over tokens kept at both layers.
# A sharp (near-permutation) matrix means the current layer's expert alone tells us what to prefetch next; a
# matrix whose rows all look like the next layer's load means it tells us nothing beyond the frequency prior.
#
# The table scores two predictors of the next layer's top-1 expert: the **frequency prior** (always the
# next layer's most loaded expert) and the **max-conditional** rule (the most likely next expert given the
# current one). Both are fitted on the `train` split and scored on this split, so they are honest held-out
# baselines; the in-sample column fits and scores on this split (an optimistic upper bound for a lookup
# table). `same id` is the rate at which the next layer picks the same expert index — expert ids are not
# aligned across layers, so this should sit near chance.


# %%
def transition_counts(top1_NL: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """(E, E) counts of (expert at layer, expert at layer + 1) over tokens kept at both."""
    current, following = top1_NL[:, layer], top1_NL[:, layer + 1]
    both = (current >= 0) & (following >= 0)
    flat = current[both] * num_experts + following[both]
    return np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def rule_accuracy(counts_EE: np.ndarray, rule_E: np.ndarray) -> float:
    """Accuracy on ``counts_EE`` of predicting next = rule_E[current]."""
    return float(counts_EE[np.arange(len(rule_E)), rule_E].sum() / max(counts_EE.sum(), 1))


fit_split = store.split("train") if "train" in store.splits else split
fit_top1_NL = fit_split.array("experts")[:, :, 0].astype(np.int64)
pairs = range(num_layers - 1)
rows = []
transition_probs = []
for layer in pairs:
    counts_EE = transition_counts(top1_NL, layer, num_experts)
    fit_EE = transition_counts(fit_top1_NL, layer, num_experts)
    transition_probs.append(counts_EE / np.clip(counts_EE.sum(axis=1, keepdims=True), 1, None))
    prior_rule_E = np.full(num_experts, fit_EE.sum(axis=0).argmax())
    rows.append(
        {
            "pair": f"{layers[layer]} → {layers[layer + 1]}",
            "tokens": int(counts_EE.sum()),
            "prior acc": rule_accuracy(counts_EE, prior_rule_E),
            "max-conditional acc": rule_accuracy(counts_EE, fit_EE.argmax(axis=1)),
            "max-conditional acc (in-sample)": rule_accuracy(counts_EE, counts_EE.argmax(axis=1)),
            "same id": rule_accuracy(counts_EE, np.arange(num_experts)),
            "chance (1/E)": 1 / num_experts,
        }
    )
transition_table = pd.DataFrame(rows).set_index("pair")
transition_table["gain over prior"] = transition_table["max-conditional acc"] - transition_table["prior acc"]

if transition_probs:
    fig, axes = plt.subplots(
        1,
        len(transition_probs),
        figsize=(3.6 * len(transition_probs), 3.6),
        squeeze=False,
        layout="constrained",
    )
    for ax, layer, probs_EE in zip(axes[0], pairs, transition_probs, strict=True):
        image = ax.imshow(probs_EE, cmap="magma", vmin=0, vmax=1)
        ax.set(
            title=f"{layers[layer]} → {layers[layer + 1]}",
            xlabel=f"expert at {layers[layer + 1]}",
            ylabel=f"expert at {layers[layer]}",
            xticks=range(num_experts),
            yticks=range(num_experts),
        )
    fig.colorbar(image, ax=axes[0].tolist(), label="P(next | current)", shrink=0.8)
    plt.show()
print(f"fitted on split {fit_split.name!r}, scored on {split_name!r}")
transition_table

# %% [markdown]
# ## 4. Router entropy
#
# Per-token entropy of the router's softmax, computed in float32 from the stored float16 logits and divided by
# ln E (0 = one expert gets all the probability, 1 = uniform). A router near 1 barely prefers its chosen
# expert, so its top-1 choice flips on small changes of the hidden state: hard to predict from anything, and a
# prefetcher facing it should spend its budget on several candidate experts rather than one.

# %%
logits_NLE = split.array("logits").astype(np.float32)
shifted_NLE = logits_NLE - logits_NLE.max(axis=-1, keepdims=True)
log_probs_NLE = shifted_NLE - np.log(np.exp(shifted_NLE).sum(axis=-1, keepdims=True))
entropy_NL = -(np.exp(log_probs_NLE) * log_probs_NLE).sum(axis=-1) / np.log(num_experts)

fig, ax = plt.subplots(figsize=(1.5 + 1.4 * num_layers, 3.2), layout="constrained")
ax.violinplot([entropy_NL[:, layer] for layer in range(num_layers)], showmedians=True)
# The y axis is left to autoscale: a nearly uniform router would otherwise be a flat line at the top.
ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1, label="uniform router")
ax.set(xticks=range(1, num_layers + 1), xticklabels=layers, ylabel="entropy / ln E")
ax.legend(loc="lower right", fontsize=8)
ax.set_title(f"router entropy per token ({split_name})")
plt.show()

entropy_table = pd.DataFrame(
    {
        "mean": entropy_NL.mean(axis=0),
        "p10": np.percentile(entropy_NL, 10, axis=0),
        "median": np.median(entropy_NL, axis=0),
        "p90": np.percentile(entropy_NL, 90, axis=0),
    },
    index=pd.Index(layers, name="layer"),
)
if health:
    entropy_table["summary: mean"] = [health[name]["gate_entropy_normalised"] for name in layers]
entropy_table

# %% [markdown]
# ## 5. Temporal locality
#
# How often a token's top-1 expert at a layer equals the previous token's in the same traced sequence (same
# `seq`; rows are ordered by position within it). This is the "previous-token" baseline and what a cache
# keeps for free between decode steps. Chance is Σ f_i², the match rate of two independent draws from that
# layer's load f; repeats above chance are real locality a predictor can exploit.

# %%
same_seq = seq_N[1:] == seq_N[:-1]
current_ML, previous_ML = top1_NL[1:][same_seq], top1_NL[:-1][same_seq]
both_kept_ML = (current_ML >= 0) & (previous_ML >= 0)
repeat_L = ((current_ML == previous_ML) & both_kept_ML).sum(axis=0) / np.clip(both_kept_ML.sum(axis=0), 1, None)
top1_load_LE = np.stack(
    [np.bincount(top1_NL[top1_NL[:, layer] >= 0, layer], minlength=num_experts) for layer in range(num_layers)]
)
top1_load_LE = top1_load_LE / np.clip(top1_load_LE.sum(axis=1, keepdims=True), 1, None)
temporal_table = pd.DataFrame(
    {
        "repeat rate": repeat_L,
        "chance Σf²": np.square(top1_load_LE).sum(axis=1),
        "token pairs": both_kept_ML.sum(axis=0),
    },
    index=pd.Index(layers, name="layer"),
)
temporal_table["ratio to chance"] = temporal_table["repeat rate"] / temporal_table["chance Σf²"]

fig, ax = plt.subplots(figsize=(1.5 + 1.4 * num_layers, 3.0), layout="constrained")
positions = np.arange(num_layers)
ax.bar(positions - 0.2, temporal_table["repeat rate"], width=0.4, label="same expert as previous token")
ax.bar(positions + 0.2, temporal_table["chance Σf²"], width=0.4, label="chance (Σ f²)", color="0.7")
ax.set(xticks=positions, xticklabels=layers, ylabel="rate", ylim=(0, 1))
ax.set_title(f"temporal repeat of the top-1 expert ({split_name})")
ax.legend(loc="upper right", fontsize=8)
plt.show()
temporal_table
