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
# # 04 — Prefetch simulation: what do the predictions buy?
#
# `spec-evaluate` replays the held-out tokens as a batch-1 decode stream on a simulated GPU whose expert cache holds
# only a fraction of all experts; the rest wait in host memory and cross PCIe on demand, or earlier when a policy
# prefetches them (`speculation/cache/`). This notebook reads `eval/simulation.csv` and asks:
#
# 1. **Bounds** — how far apart are on-demand LRU, the computed bounds and the oracle (perfect predictions)?
# 2. **Policies at one cache size** — latency, stall, hit rate, bytes moved and wasted per policy and eviction.
# 3. **Cache-size sweep** — where prefetching helps and where the link is the bottleneck.
# 4. **Bytes vs latency** — does the confidence-driven budget beat the fixed top-B budgets at equal bytes moved?
# 5. **Lookahead** — how the gain changes when prefetches are issued 1, 2, 3 layers ahead.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`), `SPEC_CACHE_FRACTION` (default `0.5`) and `SPEC_LOOKAHEAD`
# (default `2`). Runs of one predictor that differ only in their seed are averaged.

# %%
import json
import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from speculation.notebooks import workdir_from_env
from speculation.predictors.trained import seed_group

workdir = workdir_from_env()
eval_dir = workdir / "eval"
frame = pd.read_csv(eval_dir / "simulation.csv", keep_default_na=False, na_values=[""])
frame["predictor"] = frame["predictor"].fillna("").map(seed_group)  # seeds of one predictor averaged
stats = json.loads((eval_dir / "simulation.json").read_text())
fractions = sorted(frame["cache_fraction"].unique())
fraction = min(fractions, key=lambda f: abs(f - float(os.environ.get("SPEC_CACHE_FRACTION", "0.5"))))
lookahead = int(os.environ.get("SPEC_LOOKAHEAD", "2"))
lookahead = min(sorted(set(frame["lookahead"]) - {0}), key=lambda d: abs(d - lookahead))
key = ["policy", "predictor", "eviction", "budget", "lookahead", "cache_fraction"]
table = frame.groupby(key, sort=False).mean(numeric_only=True).reset_index()
timing = stats["timing"]
print(
    f"{workdir}: {stats['runs']} replays, {stats['events_per_s'] / 1e6:.1f} M layer-events/s; "
    f"{stats['target']['name']} on {stats['hardware']['name']}: one expert {timing['expert_bytes'] / 1e6:.2f} MB, "
    f"copy {timing['copy_s'] * 1e6:.0f} µs, rest of a layer {timing['non_expert_s'] * 1e6:.0f} µs"
)

# %% [markdown]
# ## 1. Bounds
# Pure compute is the floor; on-demand with Belady eviction is the best any on-demand policy can do; the overlap
# bound (`bound_ms`) is the best any policy can do: the fewest copies any schedule needs, perfectly overlapped.


# %%
def ms(rows: pd.DataFrame, policy: str, eviction: str, d: int) -> float:
    pick = rows[(rows["policy"] == policy) & (rows["eviction"] == eviction) & (rows["lookahead"] == d)]
    return float(pick["ms_per_token"].iloc[0]) if len(pick) else float("nan")


bounds = pd.DataFrame(
    [
        {
            "cache_fraction": f,
            "pure_compute": rows["compute_ms"].min(),
            "overlap_bound": rows["bound_ms"].min(),
            "on_demand_belady": ms(rows, "on_demand", "belady", 0),
            "oracle_belady": ms(rows, "oracle", "belady", lookahead),
            "oracle_lru": ms(rows, "oracle", "lru", lookahead),
            "on_demand_lru": ms(rows, "on_demand", "lru", 0),
        }
        for f, rows in table.groupby("cache_fraction")
    ]
).set_index("cache_fraction")
display(bounds.round(3))
assert (frame["ms_per_token"] >= frame["bound_ms"] - 1e-9).all(), "a policy beat the overlap bound"

# %% [markdown]
# ## 2. Every policy at one cache size
# Speedup is against on-demand LRU at the same cache size; `oracle_gain_fraction` is the share of the oracle's gain
# (same eviction, same lookahead) a policy achieves. Wasted bytes are prefetched experts evicted before any use.

# %%
at = table[(table["cache_fraction"] == fraction) & table["lookahead"].isin([0, lookahead])]
columns = ["policy", "predictor", "eviction", "budget", "ms_per_token", "stall_ms", "hit_rate", "bytes_moved",
           "wasted_bytes", "speedup_vs_on_demand", "oracle_gain_fraction"]  # fmt: skip
shown = at[columns].assign(bytes_moved=at["bytes_moved"] / 1e6, wasted_bytes=at["wasted_bytes"] / 1e6)
display(shown.rename(columns={"bytes_moved": "MB_moved", "wasted_bytes": "MB_wasted"}).round(3))

fig, ax = plt.subplots(figsize=(9, 0.3 * len(at) + 1.5))
labels = [f"{r.policy} {r.predictor} {r.eviction} B={r.budget}" for r in at.itertuples()]
ax.barh(labels, at["compute_ms"], color="tab:blue", label="compute")
ax.barh(labels, at["stall_ms"], left=at["compute_ms"], color="tab:red", label="stall")
ax.invert_yaxis()
ax.set_xlabel("ms per token")
ax.set_title(f"cache {fraction:.0%}, lookahead {lookahead}")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Cache-size sweep (LRU eviction)

# %%
lru = table[(table["eviction"] == "lru") & table["lookahead"].isin([0, lookahead])]
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for (policy, predictor, budget), line in lru.groupby(["policy", "predictor", "budget"], sort=False):
    line = line.sort_values("cache_fraction")
    label = f"{policy} {predictor} B={budget}".replace("  ", " ")
    axes[0].plot(line["cache_fraction"], line["ms_per_token"], marker="o", ms=3, label=label)
    axes[1].plot(line["cache_fraction"], line["hit_rate"], marker="o", ms=3, label=label)
axes[0].set_ylabel("ms per token")
axes[1].set_ylabel("hit rate")
for ax in axes:
    ax.set_xlabel("cache fraction")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 4. Bytes moved vs latency
# Each point is one prefetch policy at this cache size and lookahead (LRU eviction). A budget rule is better than
# another at equal bytes when its point lies below the line through the other's points.

# %%
prefetch = at[(at["eviction"] == "lru") & (at["policy"] != "on_demand")]
fig, ax = plt.subplots(figsize=(7, 4.5))
for (policy, predictor), points in prefetch.groupby(["policy", "predictor"], sort=False):
    points = points.sort_values("bytes_moved")
    ax.plot(points["bytes_moved"] / 1e6, points["ms_per_token"], marker="o", label=f"{policy} {predictor}")
ax.set_xlabel("MB moved per token")
ax.set_ylabel("ms per token")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 5. Lookahead
# Gain over on-demand LRU at this cache size as prefetches are issued further ahead: more time to hide each copy,
# but less accurate predictions.

# %%
gain = table[(table["cache_fraction"] == fraction) & (table["lookahead"] > 0) & (table["eviction"] == "lru")]
display(
    gain.pivot_table(index=["policy", "predictor", "budget"], columns="lookahead", values="speedup_vs_on_demand").round(
        3
    )
)
