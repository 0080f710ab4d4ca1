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
# `spec-evaluate` replays the held-out tokens as a batch-1 decode stream on a simulated GPU whose expert cache
# holds only a fraction of all experts; the rest wait in host memory and cross PCIe on demand, or earlier when a
# policy prefetches them. Every table is a function of `speculation.cache.tables` on `eval/simulation.csv` (runs
# of one predictor that differ only in their seed averaged), every figure one of `speculation.plots`: the tables
# and figures of `report.md`.
#
# 1. **Bounds** — how far apart are on-demand LRU, the computed bounds and the oracle (perfect predictions)?
# 2. **Policies at one cache size** — latency, stall, hit rate, bytes moved and wasted per policy and eviction.
# 3. **Cache-size sweep** — where prefetching helps and where the link is the bottleneck.
# 4. **Bytes vs latency** — does the confidence-driven budget beat the fixed top-B budgets at equal bytes moved?
# 5. **Lookahead** — how the gain changes when prefetches are issued 1, 2, 3 layers ahead.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`), `SPEC_CACHE_FRACTION` (default: the report's headline) and
# `SPEC_LOOKAHEAD` (default: the report's headline). The timing model and the bounds: `docs/simulator.md`.

# %%
import os

import pandas as pd
from IPython.display import display

from speculation.cache import tables
from speculation.notebooks import show_figures_inline, workdir_from_env
from speculation.plots import cache_sweep, latency_breakdown

show_figures_inline()  # the library's figures render inline
workdir = workdir_from_env()
frame, stats = tables.read_simulation(workdir.eval())
table = tables.seed_groups(frame)
fractions, lookaheads = sorted(table["cache_fraction"].unique()), sorted(set(table["lookahead"]) - {0})
fraction = float(os.environ.get("SPEC_CACHE_FRACTION", 0.5 if 0.5 in fractions else fractions[0]))
lookahead = int(os.environ.get("SPEC_LOOKAHEAD", 2 if 2 in lookaheads else lookaheads[0]))
if fraction not in fractions or lookahead not in lookaheads:
    raise ValueError(f"simulated cache fractions {fractions} and lookaheads {lookaheads}; pick one of those")
timing = stats["timing"]
pd.set_option("display.float_format", "{:.3f}".format)
print(f"{workdir.root}: {stats['runs']} replays; {stats['target']['name']} on {stats['hardware']['name']}: one expert "
      f"{timing['expert_bytes'] / 1e6:.2f} MB, copy {timing['copy_s'] * 1e6:.0f} µs, rest of a layer "
      f"{timing['non_expert_s'] * 1e6:.0f} µs")  # fmt: skip

# %% [markdown]
# ## 1. Bounds (ms/token)
# Pure compute is the floor; on-demand Belady is the best any on-demand policy can do; the overlap bound is the best
# any policy can do (the fewest copies any schedule needs, perfectly overlapped).

# %%
tables.bounds(table, lookahead)

# %% [markdown]
# ## 2. Every policy at one cache size
# Speedup is against on-demand LRU at the same cache size; `oracle_gain_fraction` the share of the oracle's gain
# (same eviction, same lookahead) a policy achieves. Bytes moved and wasted are per token.

# %%
display(
    tables.headline(table, fraction, lookahead)[["policy", "predictor", "seeds", "eviction", "budget", *tables.SHOWN]]
)
latency_breakdown(table, fraction, lookahead)

# %% [markdown]
# ## 3. Cache-size sweep
# The table: every policy's speedup with LRU eviction. The figure: one line per policy, its fastest predictor,
# eviction and budget at the headline cache fraction.

# %%
display(tables.sweep(table, lookahead, column="speedup_vs_on_demand"))
cache_sweep(tables.sweep_lines(table, fraction, lookahead), fraction, lookahead)

# %% [markdown]
# ## 4. Bytes moved vs latency
# A predictor's fixed budgets trace a bytes-vs-latency curve; the confidence rule beats them when its latency is
# below that curve at its own bytes (`difference_ms` < 0).

# %%
tables.equal_bytes(table, fraction, lookahead)

# %% [markdown]
# ## 5. Lookahead
# Speedup over on-demand LRU at this cache size as prefetches are issued further ahead: more time to hide each copy,
# but less accurate predictions.

# %%
tables.by_lookahead(table, fraction)
