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
# # 03 — Training runs: what did each learned predictor learn, and which loss terms matter?
#
# `spec-train` writes one folder per run under `workdir/predictors/<run>/` (`predictor.json`, written last,
# `metrics.json`, `curves.csv`). `speculation.predictors.runs` reads only those files, never the W&B server, so this
# works offline and on runs logged with `logger=none`:
#
# 1. **Runs** — what was trained, for how long, and how good its best checkpoint is; loss weights that differ from
#    the workdir's most common loss config are spelled out, so ablations label themselves.
# 2. **Loss terms over steps** — whether each term still falls, and whether validation follows training.
# 3. **Ablations** — runs grouped by kind and loss changes, mean ± sd over seeds: does dropping or re-weighting a
#    term change accuracy by more than the seed noise?
# 4. **Schedule sanity** — one run's learning rate and gradient norm against its configured schedule and clip.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`) and `SPEC_RUN` (default: the first run of the table), the run of
# section 4. Runs still training are listed and skipped; a workdir without finished runs gives a note instead.

# %%
import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from speculation.notebooks import workdir_from_env
from speculation.predictors import runs as training_runs

workdir = workdir_from_env()
runs = training_runs.finished_runs(workdir.predictors)
pd.set_option("display.precision", 3)
if runs.skipped:
    display(pd.Series(runs.skipped, name="reason").rename_axis("skipped run").to_frame())
if runs.table.empty:
    display(Markdown(f"**No finished training runs** under `{workdir.predictors}`: train one with "
                     f"`spec-train experiment=smoke workdir={workdir.root}`."))  # fmt: skip

# %% [markdown]
# ## 1. Runs
#
# `best step` is the evaluation with the lowest validation routing loss (the checkpoint `spec-evaluate` loads); its
# top-1 columns are that checkpoint's accuracy per lookahead on the fixed validation windows. `loss changes` diffs
# each run's loss weights against the most common ones (printed below).

# %%
if not runs.table.empty:
    display(training_runs.runs_table(runs))
    print("reference loss config:", training_runs.reference_loss(runs.config).to_dict())

# %% [markdown]
# ## 2. Loss terms over steps
#
# Training values (a rolling mean over ~2 % of the longest run) as lines, validation values as dots. A validation
# term that rises while its training curve falls is overfitting; one that tracks training is what early stopping on
# `val/routing` relies on. Terms with weight 0 are logged too: they show how the other terms move them.

# %%
if not runs.table.empty:
    curves = runs.curves
    terms = [c.removeprefix("train/") for c in curves if c.startswith("train/") and c != "train/grad_norm"]
    window = max(1, curves.groupby("run").size().max() // 50)
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.0), squeeze=False, layout="constrained")
    for ax, term in zip(axes[0], terms, strict=True):
        for run, rows in curves.groupby("run", sort=False):
            line = ax.plot(rows["step"], rows[f"train/{term}"].rolling(window, min_periods=1).mean(), label=run)[0]
            if f"val/{term}" in rows:
                ax.scatter(rows["step"], rows[f"val/{term}"], color=line.get_color(), s=14, edgecolors="k")
        ax.set(title=term, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    plt.show()

# %% [markdown]
# ## 3. Ablations
#
# Mean and sd over seeds of the best validation numbers per (kind, loss changes), and the change of each group's
# mean top-1 against its kind's reference group: a change smaller than the seed sd is not evidence either way.
# Groups whose runs differ in anything but seed and name are listed below the table (their sd mixes that in).

# %%
if not runs.table.empty:
    display(training_runs.ablations(runs))
    for group, keys in training_runs.varying_config(runs).items():
        print(f"note: runs of {' · '.join(group)} also differ in {', '.join(keys)}")

# %% [markdown]
# ## 4. Schedule sanity
#
# The logged learning rate against `lr_at` (linear warm-up, then cosine) applied to the run's own config, and the
# gradient norm before clipping against `train.grad_clip`. A grad norm pinned at the clip all run long means the
# effective learning rate is lower than configured. Last: for every run, the largest gap between the logged total
# loss and the weighted sum of its logged terms (it should be at float precision).

# %%
if not runs.table.empty:
    run = os.environ.get("SPEC_RUN") or training_runs.runs_table(runs).index[0]
    if run not in runs.table.index:
        raise ValueError(f"SPEC_RUN={run!r} is not a finished run; choose one of {list(runs.table.index)}")
    check = training_runs.schedule_check(runs, run)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    check.plot(x="step", y=["lr", "configured_lr"], style=["-", "k--"], ax=axes[0], title=f"learning rate, {run}")
    check.plot(x="step", y=["grad_norm", "grad_clip"], style=["-", "k--"], ax=axes[1], logy=True, title="grad norm")
    plt.show()
    peak = check["configured_lr"].max()
    print(f"{run}: max |logged − configured lr| = {(check['lr'] - check['configured_lr']).abs().max() / peak:.1e} "
          f"of the peak; {(check['grad_norm'] > check['grad_clip']).mean():.0%} of steps clipped")  # fmt: skip
    display(training_runs.total_loss_error(runs).rename("max |total − Σ weight·term|").to_frame())
