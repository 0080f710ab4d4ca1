"""``spec-compare``: put several evaluated workdirs (or every job of a Hydra multirun) side by side.

:func:`compare` returns one long DataFrame: a row per (workdir, method, lookahead) with the headline prediction
metrics, each workdir's simulation headline, its identity (model, router, corpus, traces fingerprint) and the
config keys whose values differ between the workdirs. :func:`write_comparison` writes it as ``comparison.csv``, a
``comparison.md`` headline table (one row per workdir) and a figure (PNG and PDF).

Where a workdir's config comes from: a multirun job's own ``.hydra/config.yaml``; else the newest Hydra log of the
workdir (``logs/<stage>/<time>/.hydra/config.yaml``, the pipeline's or else evaluate's); else only what its files
say (the identity columns).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speculation.cache import tables as sim_tables
from speculation.errors import UserError
from speculation.evaluation.report import IDENTITY
from speculation.evaluation.tables import aggregate, labels, read_metrics, representatives
from speculation.identity import flatten
from speculation.io import atomic_write_text
from speculation.markdown import to_markdown
from speculation.plots import save_figure
from speculation.workdir import Workdir

log = logging.getLogger(__name__)
METRICS = ["top1_acc", "recall_at_budget", "miss_top1_acc", "ece", "kl"]
# Keys that say where or how a job ran, never what it measured: not comparison columns even when they differ.
PLACEMENT = re.compile(
    r"^(workdir|experiment_name|device|threads|logger\..*|command_overrides|run_name|train\.overwrite)$"
)


@dataclass
class Source:
    """One evaluated workdir and the config it was made with (flattened; empty when none was found)."""

    workdir: Path
    config: dict[str, Any] = field(default_factory=dict)


def hydra_config(path: Path) -> dict[str, Any]:
    """A job's saved ``.hydra/config.yaml``, resolved and flattened. Hydra saves it unresolved, so interpolations
    such as ``workdir=outputs/b${eval.prefetch_budget}`` or ``${hydra:runtime.choices.router}`` are resolved here,
    the latter against the job's own ``hydra.yaml`` beside it."""

    def load(file: Path) -> Any:  # the hydra resolver needs a live job; a plain node path does not
        return OmegaConf.create(yaml.safe_load(file.read_text().replace("${hydra:", "${hydra.")) or {})

    config = load(path)
    if (path.parent / "hydra.yaml").is_file():  # only the job's facts: its run/sweep dirs need live resolvers
        job = load(path.parent / "hydra.yaml").hydra
        config.hydra = {key: job[key] for key in ("runtime", "job", "overrides") if key in job}
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:  # a resolver this process lacks: compare the values as written
        log.warning("%s: kept its interpolations unresolved (%s)", path, error)
        resolved = OmegaConf.to_container(config, resolve=False)
    resolved.pop("hydra", None)
    return flatten(resolved)


def newest_log_config(workdir: Path) -> dict[str, Any]:
    """The newest pipeline (else evaluate) Hydra log config under ``workdir/logs``, flattened; {} if none."""
    for stage in ("pipeline", "evaluate"):
        configs = sorted((workdir / "logs" / stage).glob("*/.hydra/config.yaml"))
        if configs:
            return hydra_config(configs[-1])
    return {}


def sources(paths: Sequence[Path]) -> list[Source]:
    """Workdirs and multirun directories (each job's ``<n>/.hydra/config.yaml`` names its workdir) as sources."""
    found: list[Source] = []
    for path in map(Path, paths):
        jobs = sorted(path.glob("*/.hydra/config.yaml"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
        if jobs:  # a multirun directory
            found += [Source(Path(config["workdir"]), config) for config in map(hydra_config, jobs)]
        elif (path / "eval").is_dir() or (path / "traces").is_dir():
            found.append(Source(path, newest_log_config(path)))
        else:
            raise UserError(
                f"{path} is neither a workdir (no eval/ or traces/) nor a Hydra multirun directory (no "
                "<n>/.hydra/config.yaml); pass workdirs that spec-evaluate wrote, or a multirun directory."
            )
    unevaluated = [str(s.workdir) for s in found if not (Workdir(s.workdir).eval() / "metrics.csv").is_file()]
    if unevaluated:
        raise UserError(f"no evaluation in {', '.join(unevaluated)}; run spec-evaluate there first.")
    return found


def simulation_headline(eval_dir: Path) -> dict[str, Any]:
    """The best realizable policy at the simulation's headline cache fraction and lookahead, with on-demand LRU."""
    try:
        frame, stats = sim_tables.read_simulation(eval_dir)
    except Exception:  # no simulation (sim.enabled=false): the columns stay empty
        return {}
    table = sim_tables.seed_groups(frame)
    fractions, lookaheads = sorted(set(table["cache_fraction"])), sorted(set(table["lookahead"]) - {0})
    fraction = stats.get("headline_fraction", fractions[len(fractions) // 2])  # older simulation.json: the middle
    lookahead = stats.get("headline_lookahead", lookaheads[-1])
    return {f"sim_{key}": value for key, value in sim_tables.headline_numbers(table, fraction, lookahead).items()}


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys (flattened) whose value is not the same in every config (absent counts as a value)."""
    keys = sorted({key for config in configs for key in config if not PLACEMENT.match(key)})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def config_value(config: dict[str, Any], key: str) -> Any:
    """A config column's cell: the value, ``"null"`` for a null one (pandas would print NaN), ``""`` if absent."""
    if key not in config:
        return ""
    return "null" if config[key] is None else config[key]


def compare(paths: Sequence[Path]) -> pd.DataFrame:
    """The long comparison frame of ``paths`` (workdirs or multirun directories; see the module docstring)."""
    found = sources(paths)
    differing = differing_keys([s.config for s in found])
    rows = []
    for source in found:
        eval_dir = Workdir(source.workdir).eval()
        frame, _ = read_metrics(eval_dir)
        pooled = aggregate(frame)
        columns = {**{key: config_value(source.config, key) for key in differing}, **simulation_headline(eval_dir)}
        for _, row in pooled.iterrows():
            rows.append({**row[IDENTITY].to_dict(), "workdir": str(source.workdir), **columns,
                         "method": row["method"], "seeds": int(row["seeds"]), "role": row["role"],
                         "kind": row["kind"], "lookahead": int(row["lookahead"]),
                         **{m: row[m] for m in METRICS}})  # fmt: skip
    out = pd.DataFrame(rows)
    out.attrs["differing_keys"] = differing
    return out


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per workdir: its differing keys, gate-lookahead's and the best trained method's top-1 per lookahead,
    and the simulation headline."""
    keys = ["workdir", *frame.attrs.get("differing_keys", []), "router", "corpus"]
    out = []
    for _, rows in frame.groupby("workdir", sort=False):
        record = {key: rows[key].iloc[0] for key in dict.fromkeys(keys)}
        for d, at in rows.groupby("lookahead"):
            gate = at[at["method"] == "gate_lookahead"]["top1_acc"]
            trained = representatives(at[at["role"] == "trained"])  # a seed group by its mean, not its best seed
            record[f"gate_lookahead top-1 d={d}"] = float(gate.iloc[0]) if len(gate) else float("nan")
            if len(trained):
                best = trained.loc[trained["top1_acc"].idxmax()]
                record[f"best trained top-1 d={d}"] = float(best["top1_acc"])
                record[f"best trained d={d}"] = labels(best.to_frame().T)[0]
        for column in ("sim_best_policy", "sim_best_ms_per_token", "sim_best_oracle_gain_fraction"):
            if column in rows:
                record[column] = rows[column].iloc[0]
        out.append(record)
    return pd.DataFrame(out)


def spread_table(headline: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (n - 1), min and max over the workdirs of every numeric headline column: how much a
    headline moves between the compared runs (e.g. a ``source_train.seed`` sweep, where only the seed differs)."""
    numbers = headline.select_dtypes("number")
    return numbers.agg(["mean", "std", "min", "max"]).T.rename_axis("headline").reset_index()


def comparison_figure(frame: pd.DataFrame) -> Figure:
    """Best trained and gate-lookahead top-1 vs lookahead per workdir; simulation headline ms/token per workdir."""
    fig = Figure(figsize=(11, 4.2))
    accuracy, latency = fig.subplots(1, 2)
    labels = {w: f"{i}: {Path(w).name}" for i, w in enumerate(dict.fromkeys(frame["workdir"]))}
    for workdir, rows in frame.groupby("workdir", sort=False):
        trained = representatives(rows[rows["role"] == "trained"]).groupby("lookahead")["top1_acc"].max()
        gate = rows[rows["method"] == "gate_lookahead"].set_index("lookahead")["top1_acc"].sort_index()
        line = accuracy.plot(trained.index, trained.values, marker="o", label=f"{labels[workdir]} best trained")[0]
        accuracy.plot(gate.index, gate.values, ls="--", marker="s", color=line.get_color(), alpha=0.7,
                      label=f"{labels[workdir]} gate_lookahead")  # fmt: skip
    accuracy.set_xticks(sorted(int(d) for d in frame["lookahead"].unique()))  # lookaheads are whole layers
    accuracy.set(xlabel="lookahead d", ylabel="top-1 accuracy", title="prediction quality (test split)")
    accuracy.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=2, frameon=False)
    if "sim_best_ms_per_token" in frame:
        per_workdir = frame.groupby("workdir", sort=False).first()
        x = range(len(per_workdir))
        width = 0.27
        bars = [
            ("sim_on_demand_lru_ms_per_token", "on-demand LRU", "0.6"),
            ("sim_best_ms_per_token", "best policy", "C0"),
            ("sim_oracle_lru_ms_per_token", "oracle LRU", "0.3"),
        ]
        for offset, (column, name, color) in enumerate(bars):
            latency.bar([i + (offset - 1) * width for i in x], per_workdir[column], width, label=name, color=color)
        latency.set_xticks(list(x), [labels[w] for w in per_workdir.index], rotation=20, ha="right", fontsize=7)
        latency.set(ylabel="ms per token", title="prefetch simulation headline")
        latency.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def write_comparison(frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """comparison.csv (long), comparison.md (one row per workdir) and comparison.png / .pdf under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "comparison.csv", "markdown": out_dir / "comparison.md"}
    atomic_write_text(paths["csv"], frame.to_csv(index=False))
    table = headline_table(frame)
    formats = {c: "{:.3f}" for c in table.columns if "top-1" in c or "ms_per_token" in c}
    formats |= {c: "{:.1%}" for c in table.columns if "gain" in c}
    differing = frame.attrs.get("differing_keys", [])
    lines = ["# Comparison", "", f"{table.shape[0]} workdirs; config keys that differ: "
             f"{', '.join(f'`{k}`' for k in differing) or 'none'}. Test-split top-1; the simulation's headline "
             "(best realizable policy, ms/token, share of the oracle's gain). Every metric per method and lookahead: "
             "`comparison.csv`.", "", to_markdown(table, formats), ""]  # fmt: skip
    if len(table) >= 2:
        spread = spread_table(table.drop(columns=[key for key in differing if key in table]))  # not the swept keys
        lines += ["## Spread over the workdirs", "", "Of each headline number above: its mean, standard deviation "
                  "(n - 1), min and max over the workdirs.", "",
                  to_markdown(spread, dict.fromkeys(["mean", "std", "min", "max"], "{:.4f}")), ""]  # fmt: skip
    atomic_write_text(paths["markdown"], "\n".join(lines))
    paths["png"] = save_figure(comparison_figure(frame), out_dir / "comparison.png")
    paths["pdf"] = paths["png"].with_suffix(".pdf")
    return paths


def cli(argv: Sequence[str] | None = None) -> None:
    """``spec-compare WORKDIR_OR_MULTIRUN... [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="spec-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="evaluated workdirs and/or Hydra multirun directories")
    parser.add_argument("--out", type=Path, default=Path("outputs/comparison"), help="where the table and figure go")
    args = parser.parse_args(argv)
    try:
        paths = write_comparison(compare(args.paths), args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(paths["markdown"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
