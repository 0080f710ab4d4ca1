"""The training runs of a workdir as DataFrames: what each run is, how it trained, and ablations over seeds.

Reads only the files a finished run leaves (``predictor.json``, ``metrics.json``, ``curves.csv``), never W&B, so it
works offline and on runs logged with ``logger=none``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from speculation.config.predictor import LOSS_TERMS
from speculation.config.stages import PLACEMENT_KEYS
from speculation.trainer import lr_at
from speculation.workdir import CURVES_FILE, METRICS_FILE, PREDICTOR_FILE, STATE_FILE

REFERENCE = "reference"  # the loss-changes label of runs trained with the workdir's most common loss weights
# Config keys that name or place a run without changing what it learns: the seed and what a run's identity leaves out.
NAMING_KEYS = "^(" + "|".join(re.escape(key) + r"($|\.)" for key in ("seed", *PLACEMENT_KEYS)) + ")"


@dataclass
class Runs:
    """The finished runs under one ``Workdir.predictors`` and the ones skipped (still training or unreadable)."""

    table: pd.DataFrame  # one row per run: predictor.json (less its config) and metrics.json, flattened
    config: pd.DataFrame  # each run's full resolved config, flattened to dotted keys
    curves: pd.DataFrame  # every run's curves.csv, with a ``run`` column
    skipped: dict[str, str]  # run -> why it is not in the tables

    @property
    def lookaheads(self) -> list[int]:
        return sorted(int(c.removeprefix("best.val/top1_d")) for c in self.table if c.startswith("best.val/top1_d"))


def finished_runs(predictors_dir: Path) -> Runs:
    """Every run directory under ``predictors_dir`` with its three files; the others listed as skipped."""
    metas, metrics, curves, skipped = {}, {}, {}, {}
    run_dirs = sorted(p for p in predictors_dir.iterdir() if p.is_dir()) if predictors_dir.is_dir() else []
    for run_dir in run_dirs:
        if not (run_dir / PREDICTOR_FILE).is_file():
            training = (run_dir / STATE_FILE).is_file()
            skipped[run_dir.name] = f"still training ({STATE_FILE}, no {PREDICTOR_FILE})" if training else "unfinished"
            continue
        meta = json.loads((run_dir / PREDICTOR_FILE).read_text())
        missing = [name for name in (METRICS_FILE, CURVES_FILE) if not (run_dir / name).is_file()]
        if meta.get("type") != "learned" or missing:
            skipped[run_dir.name] = (
                f"type {meta.get('type')!r}" if meta.get("type") != "learned" else f"lacks {missing}"
            )
            continue
        metas[run_dir.name] = meta
        metrics[run_dir.name] = json.loads((run_dir / METRICS_FILE).read_text())
        curves[run_dir.name] = pd.read_csv(run_dir / CURVES_FILE)
    names = pd.Index(list(metas), name="run")
    if not metas:
        return Runs(pd.DataFrame(index=names), pd.DataFrame(index=names), pd.DataFrame(), skipped)
    config = pd.json_normalize([meta["config"] for meta in metas.values()]).set_index(names)
    table = pd.concat(
        [
            pd.json_normalize([{k: v for k, v in meta.items() if k != "config"} for meta in metas.values()]),
            pd.json_normalize(list(metrics.values())),
        ],
        axis=1,
    ).set_index(names)
    curves_frame = pd.concat(curves, names=["run", "row"]).reset_index("row", drop=True).reset_index()
    table["loss_changes"] = loss_changes(config)
    table["stopped_early"] = table["steps_run"] < config["train.steps"]
    return Runs(table, config, curves_frame, skipped)


def loss_config(config: pd.DataFrame) -> pd.DataFrame:
    return config.filter(like="loss.").rename(columns=lambda c: c.removeprefix("loss."))


def reference_loss(config: pd.DataFrame) -> pd.Series:
    """The most common loss config among the runs: what an ablation is measured against."""
    losses = loss_config(config)
    return pd.Series(losses.value_counts(dropna=False).index[0], index=losses.columns)


def loss_changes(config: pd.DataFrame) -> pd.Series:
    """Per run, the loss weights it changed against :func:`reference_loss` (``confidence=0``), or ``reference``."""
    losses, reference = loss_config(config), reference_loss(config)
    changed = losses.ne(reference) & ~(losses.isna() & reference.isna())
    stacked = losses.stack()  # (run, key) -> value
    changes = stacked[changed.stack()].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
    labels = (pd.Series(changes.index.get_level_values(1), index=changes.index) + "=" + changes).groupby(level=0)
    return labels.agg(", ".join).reindex(config.index, fill_value=REFERENCE)


def runs_table(runs: Runs) -> pd.DataFrame:
    """One row per run: kind, seed, loss changes, size, steps, time and the best checkpoint's validation numbers."""
    table = runs.table
    out = pd.DataFrame(
        {
            "kind": table["kind"],
            "seed": table["seed"],
            "loss changes": table["loss_changes"],
            "parameters": table["parameters"],
            "steps run": table["steps_run"],
            "stopped early": table["stopped_early"],
            "train time [s]": table["train_time_s"],
            "best step": table["best.step"],
            "best val routing": table["best.val/routing"],
            **{f"top-1 d={d}": table[f"best.val/top1_d{d}"] for d in runs.lookaheads},
        }
    )
    # kind, then its reference run before the ablations, then seed
    ablation = out["loss changes"].ne(REFERENCE).rename("_ablation")
    return out.join(ablation).sort_values(["kind", "_ablation", "loss changes", "seed"]).drop(columns="_ablation")


def ablations(runs: Runs) -> pd.DataFrame:
    """Runs grouped by (kind, loss changes): seeds, mean and sd over seeds of the best validation top-1 per
    lookahead and routing loss, and each group's top-1 change against its kind's reference group."""
    keys, table = ["kind", "loss_changes"], runs.table
    columns = [f"best.val/top1_d{d}" for d in runs.lookaheads] + ["best.val/routing"]
    grouped = table.groupby(keys, sort=False)
    out = grouped["seed"].agg(seeds=lambda s: ", ".join(map(str, sorted(s))))
    mean, sd = grouped[columns].mean(), grouped[columns].std()
    for column in columns:
        out[f"{column} mean"], out[f"{column} sd"] = mean[column], sd[column]
    top1 = [f"best.val/top1_d{d}" for d in runs.lookaheads]
    if REFERENCE in set(table["loss_changes"]):
        reference = mean[top1].xs(REFERENCE, level="loss_changes")
        delta = mean[top1].sub(reference, level="kind")
        for column in top1:
            out[f"{column} vs reference"] = delta[column]
    return out


def varying_config(runs: Runs) -> dict[tuple[str, str], list[str]]:
    """Config keys (besides what names a run) that differ inside an ablation group: its sd then mixes them in."""
    config = runs.config.drop(columns=runs.config.columns[runs.config.columns.str.match(NAMING_KEYS)])
    groups = [runs.table["kind"], runs.table["loss_changes"]]
    varying = config.astype(str).groupby(groups).nunique() > 1
    return {group: list(row.index[row]) for group, row in varying.iterrows() if row.any()}


def schedule_check(runs: Runs, run: str) -> pd.DataFrame:
    """One run's logged learning rate beside ``lr_at`` of its own train config, and its gradient norm.

    Step ``s`` logs the rate of update ``s - 1``; a logged rate off the configured one means the run resumed under
    another config or the schedule changed since.
    """
    curves = runs.curves[runs.curves["run"] == run]
    train = SimpleNamespace(**{k.removeprefix("train."): v for k, v in runs.config.loc[run].items()
                               if k.startswith("train.")})  # fmt: skip
    return pd.DataFrame(
        {
            "step": curves["step"],
            "lr": curves["lr"],
            "configured_lr": curves["step"].map(lambda step: lr_at(step - 1, train)),
            "grad_norm": curves["train/grad_norm"],
            "grad_clip": train.grad_clip,
        }
    ).reset_index(drop=True)


def total_loss_error(runs: Runs) -> pd.Series:
    """Per run, the largest |logged total − Σ weight · term| over steps (``speculation.losses.combine``)."""
    weights = loss_config(runs.config).loc[runs.curves["run"], list(LOSS_TERMS)].to_numpy(dtype=float)
    terms = runs.curves[[f"train/{t}" for t in LOSS_TERMS]].to_numpy()
    weighted = (weights * terms).sum(axis=1, where=weights != 0)
    return (runs.curves["train/loss"] - weighted).abs().groupby(runs.curves["run"]).max()
