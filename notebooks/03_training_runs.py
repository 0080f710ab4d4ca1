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
# `spec-train` writes one folder per run under `workdir/predictors/<run>/`: `predictor.json` (kind, seed and the
# full resolved config, written last, so it marks a finished run), `metrics.json` (the best validation point,
# steps run, time, parameter count) and `curves.csv` (every loss term at every step, validation terms on
# evaluation steps). This notebook reads only those files, never the W&B server, so it works offline and on runs
# logged with `logger=none`. Each section asks one question:
#
# 1. **Runs** — what was trained, for how long, and how good its best checkpoint is. Loss weights that differ
#    from the most common loss config are spelled out, so ablations label themselves.
# 2. **Loss terms over steps** — whether each term still falls, and whether validation follows training.
# 3. **Ablations** — runs grouped by kind and loss weights, mean ± sd over seeds of the best val top-1: does
#    dropping or re-weighting a term change accuracy by more than the seed noise?
# 4. **Schedule sanity** — the learning rate and gradient norm of one run, against the configured schedule and
#    clip threshold.
#
# Inputs: `SPEC_WORKDIR` (default `outputs/smoke`, relative to the repository root) and `SPEC_RUN` (default: the
# first run of the table), the run of section 4. Runs still training (no `predictor.json`) are listed and
# skipped. In CI: `SPEC_WORKDIR=outputs/smoke pytest --nbmake notebooks/`; a workdir without finished runs
# gives a note instead of plots.

# %%
import json
import os
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from matplotlib.lines import Line2D

from speculation.notebooks import workdir_from_env
from speculation.predictors.training import STATE_FILE, lr_at

workdir = workdir_from_env()  # $SPEC_WORKDIR, default outputs/smoke
if not workdir.is_dir():
    raise FileNotFoundError(
        f"no workdir at {workdir}; set SPEC_WORKDIR to a workdir, or create one with "
        f"`spec-pipeline experiment=smoke workdir={workdir}`"
    )
predictors_dir = workdir / "predictors"
run_dirs = sorted(p for p in predictors_dir.iterdir() if p.is_dir()) if predictors_dir.is_dir() else []

# One pass over the run folders: a finished run contributes its three files; anything else is listed as skipped.
metas, metrics, curves_by_run, skipped = {}, {}, {}, {}
for run_dir in run_dirs:
    if not (run_dir / "predictor.json").is_file():
        still_training = (run_dir / STATE_FILE).is_file()
        skipped[run_dir.name] = (
            f"still training ({STATE_FILE}, no predictor.json)" if still_training else "no predictor.json"
        )
        continue
    meta = json.loads((run_dir / "predictor.json").read_text())
    missing = [name for name in ("metrics.json", "curves.csv") if not (run_dir / name).is_file()]
    if meta.get("type") != "learned" or missing:
        skipped[run_dir.name] = f"type {meta.get('type')!r}" if meta.get("type") != "learned" else f"lacks {missing}"
        continue
    metas[run_dir.name] = meta
    metrics[run_dir.name] = json.loads((run_dir / "metrics.json").read_text())
    curves_by_run[run_dir.name] = pd.read_csv(run_dir / "curves.csv")

REFERENCE = "reference"  # the loss-changes label of runs trained with the most common loss config
NO_RUNS = f"no finished runs under {predictors_dir}: nothing to show here."
pd.set_option("display.precision", 3)
if skipped:
    display(pd.Series(skipped, name="reason").rename_axis("skipped run").to_frame())
if not metas:
    display(
        Markdown(
            f"**No finished training runs** under `{predictors_dir}`"
            + (f" ({len(skipped)} unfinished, listed above)" if skipped else "")
            + ", so the sections below are empty. Train one with "
            f"`spec-train experiment=smoke workdir={workdir} predictor=contextual`."
        )
    )
    runs = pd.DataFrame()
else:
    names = pd.Index(list(metas), name="run")
    config = pd.json_normalize([meta["config"] for meta in metas.values()]).set_index(names)
    runs = pd.concat(
        [
            pd.json_normalize([{k: v for k, v in meta.items() if k != "config"} for meta in metas.values()]),
            pd.json_normalize(list(metrics.values())),
        ],
        axis=1,
    ).set_index(names)
    # Lookaheads from the best-metric keys (best.val/top1_d1, ...), in numeric order.
    lookaheads = sorted(int(c.removeprefix("best.val/top1_d")) for c in runs.columns if c.startswith("best.val/top1_d"))
    print(f"{workdir}: {len(runs)} finished run(s), {len(skipped)} skipped; lookaheads d = {lookaheads}")

# %% [markdown]
# ## 1. Runs
#
# One row per finished run. `best step` is the evaluation step with the lowest validation routing loss (the
# checkpoint `spec-evaluate` loads), and its top-1 columns are the accuracy of that checkpoint at each lookahead
# d on the fixed validation windows. `stopped early` means patience ran out before `train.steps`.
#
# `loss changes` diffs each run's `loss` config against the most common one in this workdir (printed below the
# table): `reference` means the run used it, anything else names the weights it changed, e.g. `confidence=0` for a
# run trained without the confidence head's loss. Those labels group the ablations in section 3.

# %%
if runs.empty:
    print(NO_RUNS)
else:
    loss_config = config.filter(like="loss.").rename(columns=lambda c: c.removeprefix("loss."))
    reference_loss = pd.Series(loss_config.value_counts(dropna=False).index[0], index=loss_config.columns)
    changed = loss_config.ne(reference_loss) & ~(loss_config.isna() & reference_loss.isna())
    stacked = loss_config.stack()  # (run, key) -> value; pandas 3 keeps NaN, so the mask below lines up
    changes = stacked[changed.stack()].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
    runs["loss changes"] = (
        (pd.Series(changes.index.get_level_values(1), index=changes.index) + "=" + changes)
        .groupby(level=0)
        .agg(", ".join)
        .reindex(runs.index, fill_value=REFERENCE)
    )
    # Kind, then the reference run before its ablations, then seed.
    runs = (
        runs.assign(is_ablation=runs["loss changes"].ne(REFERENCE))
        .sort_values(["kind", "is_ablation", "loss changes", "seed"])
        .drop(columns="is_ablation")
    )
    config = config.reindex(runs.index)
    run_table = pd.DataFrame(
        {
            "kind": runs["kind"],
            "seed": runs["seed"],
            "loss changes": runs["loss changes"],
            "parameters": runs["parameters"],
            "steps run": runs["steps_run"],
            "stopped early": runs["steps_run"] < config["train.steps"],
            "train time [s]": runs["train_time_s"],
            "best step": runs["best.step"],
            "best val routing": runs["best.val/routing"],
            **{f"top-1 d={d}": runs[f"best.val/top1_d{d}"] for d in lookaheads},
        }
    )
    display(run_table)
    print("reference loss config (most common):", ", ".join(f"{k}={v}" for k, v in reference_loss.items()))

# %% [markdown]
# ## 2. Loss terms over steps
#
# One panel per logged term: the weighted total `loss` that was minimised, then each term, logged even where its
# weight is 0 (dashed: the run did not train on it, so that curve shows only how the other terms move it). Lines
# are training values, a rolling mean over ~2 % of the steps of the longest run; dots are validation values at
# evaluation steps, which have no total. A validation term that rises while its training curve falls is
# overfitting; one that tracks training is what early stopping on `val/routing` relies on.

# %%
if runs.empty:
    print(NO_RUNS)
else:
    curves = pd.concat(curves_by_run, names=["run", "row"]).reset_index("row", drop=True).reset_index()
    terms = [c.removeprefix("train/") for c in curves.columns if c.startswith("train/") and c != "train/grad_norm"]
    window = max(1, curves.groupby("run").size().max() // 50)
    smooth = curves.groupby("run")[[f"train/{t}" for t in terms]].rolling(window, min_periods=1).mean()
    smooth = smooth.reset_index(level=0, drop=True).join(curves[["run", "step"]])
    run_colors = dict(zip(runs.index, plt.cm.tab10(np.arange(len(runs)) % 10), strict=True))

    columns = 3
    rows_needed = int(np.ceil((len(terms) + 1) / columns))  # + 1 panel for the legend
    fig, axes = plt.subplots(
        rows_needed,
        columns,
        figsize=(4.2 * columns, 3.0 * rows_needed),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, term in zip(axes.flat, terms, strict=False):
        for run, rows in smooth.groupby("run", sort=False):
            unused = term in loss_config and loss_config.at[run, term] == 0
            ax.plot(rows["step"], rows[f"train/{term}"], color=run_colors[run], linestyle="--" if unused else "-")
        if f"val/{term}" in curves:
            val = curves.dropna(subset=[f"val/{term}"])
            ax.scatter(
                val["step"], val[f"val/{term}"], c=val["run"].map(run_colors).tolist(), s=18, edgecolors="k", zorder=3
            )
        weight = f" (reference weight {reference_loss[term]:g})" if term in reference_loss else " (weighted total)"
        ax.set_title(term + weight, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=color, label=run) for run, color in run_colors.items()] + [
        Line2D([], [], color="k", label=f"train (rolling mean of {window})" if window > 1 else "train"),
        Line2D([], [], color="k", linestyle="--", label="train, weight 0"),
        Line2D([], [], color="w", marker="o", markerfacecolor="0.6", markeredgecolor="k", label="val"),
    ]
    axes.flat[-1].legend(handles=handles, loc="center", fontsize=8)
    fig.supxlabel("step")
    fig.suptitle("loss terms per run")
    plt.show()

# %% [markdown]
# ## 3. Ablations
#
# Runs grouped by (kind, loss changes); seeds are the replicates. Bars are the mean best val top-1 at each
# lookahead, error bars one standard deviation over seeds (none with a single seed), dots the individual seeds,
# and the dashed line chance (1/E). The table adds the best val routing loss and the change of each group's mean
# top-1 against the same kind's `reference` group: a change smaller than the seed sd is not evidence either way.
# A group whose runs differ in anything but seed and name (architecture, steps, ...) is flagged below the table,
# since its sd then mixes that change with seed noise.

# %%
if runs.empty:
    print(NO_RUNS)
else:
    group_keys = ["kind", "loss changes"]
    top1_columns = [f"best.val/top1_d{d}" for d in lookaheads]
    grouped = runs.groupby(group_keys, sort=False)[[*top1_columns, "best.val/routing"]]
    mean, sd = grouped.mean(), grouped.std()  # sd over seeds; NaN for one seed
    reference_mean = mean[top1_columns].xs(REFERENCE, level="loss changes")
    delta = mean[top1_columns].sub(reference_mean, level="kind")
    mean_sd = mean.map("{:.3f}".format) + (" ± " + sd.map("{:.3f}".format)).where(sd.notna(), "")
    labels = {f"best.val/top1_d{d}": f"top-1 d={d}" for d in lookaheads} | {"best.val/routing": "val routing"}
    ablation_table = pd.concat(
        [
            runs.groupby(group_keys, sort=False)["seed"].agg(seeds=lambda s: ", ".join(map(str, sorted(s)))),
            mean_sd.rename(columns=labels),
            delta.rename(columns=lambda c: f"Δ {labels[c]} vs reference"),
        ],
        axis=1,
    )
    display(ablation_table)
    # Config keys that vary inside a group, besides what names a run.
    identity = config.columns[config.columns.str.match(r"^(seed|run_name|workdir|device|logger\.)")]
    varying = config.drop(columns=identity).astype(str).groupby([runs["kind"], runs["loss changes"]]).nunique() > 1
    for group, row in varying.iterrows():
        if row.any():
            print(f"note: runs of {' · '.join(group)} also differ in {', '.join(row.index[row])}")

    group_names = [" · ".join(group) for group in mean.index]
    positions = np.arange(len(lookaheads))
    width = 0.8 / len(group_names)
    seeds_by_group = runs.groupby(group_keys, sort=False)[top1_columns]
    fig, ax = plt.subplots(
        figsize=(2.2 + 1.2 * len(lookaheads) * max(1, len(group_names) / 3), 3.6), layout="constrained"
    )
    for i, ((group, seed_rows), name) in enumerate(zip(seeds_by_group, group_names, strict=True)):
        offset = positions - 0.4 + (i + 0.5) * width
        color = plt.cm.tab10(i % 10)
        yerr = sd.loc[group, top1_columns].fillna(0)
        ax.bar(offset, mean.loc[group, top1_columns], width, yerr=yerr, color=color, alpha=0.85, capsize=3, label=name)
        ax.scatter(np.tile(offset, len(seed_rows)), seed_rows.to_numpy().ravel(), color="k", s=10, zorder=3)
    experts = {meta["geometry"]["num_experts"] for meta in metas.values()}
    if len(experts) == 1:
        ax.axhline(1 / experts.pop(), color="0.5", linestyle="--", linewidth=1, label="chance (1/E)")
    ax.set(xticks=positions, xticklabels=[f"d = {d}" for d in lookaheads], ylabel="best val top-1", ylim=(0, 1))
    ax.set_title("ablations: mean ± sd over seeds")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    plt.show()

# %% [markdown]
# ## 4. Schedule sanity
#
# For one run (`SPEC_RUN`): the logged learning rate against `lr_at` (linear warm-up, then cosine decay) applied to
# the run's own `train` config, and the gradient norm before clipping against `train.grad_clip`. A logged rate off
# the configured one means the run was resumed under another config or the schedule code changed since; a grad
# norm that sits at the clip threshold all run long means the learning rate is effectively lower than configured.
# The last line checks, for every run, that the logged total loss is the weighted sum of the logged terms.

# %%
if runs.empty:
    print(NO_RUNS)
else:
    run = os.environ.get("SPEC_RUN") or runs.index[0]
    if run not in runs.index:
        raise ValueError(
            f"SPEC_RUN={run!r} is not a finished run in {predictors_dir}; choose one of {list(runs.index)}"
        )
    run_curves = curves[curves["run"] == run]
    train_cfg = SimpleNamespace(**metas[run]["config"]["train"])
    expected_lr = run_curves["step"].map(lambda step: lr_at(step - 1, train_cfg))  # step s logs the lr of update s - 1

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
    axes[0].plot(run_curves["step"], run_curves["lr"], label="logged")
    axes[0].plot(run_curves["step"], expected_lr, color="k", linestyle="--", linewidth=1, label="lr_at(config)")
    axes[0].axvline(train_cfg.warmup_steps, color="0.6", linewidth=0.8, label="end of warm-up")
    axes[0].set(xlabel="step", ylabel="learning rate", title="learning rate")
    axes[0].legend(fontsize=8)
    grad_norm = run_curves["train/grad_norm"]
    axes[1].plot(run_curves["step"], grad_norm, color="tab:orange", alpha=0.4 if window > 1 else 1, label="per step")
    if window > 1:
        rolling = grad_norm.rolling(window, min_periods=1).mean()
        axes[1].plot(run_curves["step"], rolling, color="tab:orange", label=f"rolling mean of {window}")
    axes[1].axhline(train_cfg.grad_clip, color="k", linestyle="--", linewidth=1, label="grad_clip")
    axes[1].set(xlabel="step", ylabel="gradient norm (before clipping)", title="gradient norm", yscale="log")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"run {run}")
    plt.show()

    lr_error = (run_curves["lr"] - expected_lr).abs().max() / train_cfg.lr
    clipped = (grad_norm > train_cfg.grad_clip).mean()
    print(f"{run}: max |logged - configured lr| = {lr_error:.2e} of the peak lr; {clipped:.0%} of steps clipped")

    # Total = sum of weight * term over the terms with nonzero weight (speculation.losses.combine).
    loss_terms = [t for t in terms if t in loss_config]
    weights = loss_config.loc[curves["run"], loss_terms].to_numpy(dtype=float)
    weighted = np.where(weights != 0, weights * curves[[f"train/{t}" for t in loss_terms]].to_numpy(), 0.0)
    total_error = (curves["train/loss"] - weighted.sum(axis=1)).abs().groupby(curves["run"]).max()
    print(f"max |total loss - Σ weight·term| over steps: worst run {total_error.idxmax()} at {total_error.max():.1e}")
