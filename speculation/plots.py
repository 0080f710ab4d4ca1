"""Figures of the stages and notebooks: each function returns a matplotlib Figure, :func:`save_figure` writes it.

Figures are built with ``matplotlib.figure.Figure``, not pyplot: no backend, no display and no global figure state
are involved, so stages render headless (and in threads) while notebooks show the very same figures inline.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from speculation.io import atomic_path


def utilisation_heatmap(load_LE: np.ndarray, layer_labels: list[str], title: str = "") -> Figure:
    """Layers x experts heatmap of the fraction of each layer's tokens sent to each expert."""
    num_layers, num_experts = load_LE.shape
    fig = Figure(figsize=(max(4.0, 0.45 * num_experts + 2), max(2.5, 0.4 * num_layers + 1.2)))
    ax = fig.subplots()
    image = ax.imshow(load_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load_LE.max()), 1e-9))
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), labels=layer_labels)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or f"expert utilisation (uniform = {1 / num_experts:.3f})")
    if num_experts * num_layers <= 256:
        for layer in range(num_layers):
            for expert in range(num_experts):
                value = load_LE[layer, expert]
                color = "black" if value > 0.6 * load_LE.max() else "white"
                ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as ``path`` (PNG: reports, W&B) and beside it as ``.pdf`` (vector: papers), each atomically,
    so a killed run never leaves a half-written figure; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in dict.fromkeys([path, path.with_suffix(".pdf")]):
        fmt = target.suffix.lstrip(".")
        metadata = {"CreationDate": None} if fmt == "pdf" else None  # no timestamp: a rerun writes the same file
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt, metadata=metadata)
    return path


# One look per method, the same in every figure and notebook: bounds and priors grey and dashed, the heuristics
# one warm family, the router baseline purple, trained predictors one cool colour per kind (seed means bolder).
# Built-in methods have a fixed look; a method this table does not know gets one from a hash of its name.
_BUILT_IN = {"random": ("0.55", "x"), "oracle": ("0.1", "*"), "frequency": ("0.4", "v"),
             "previous_token": ("0.4", "<"), "layer_minus_1": ("tab:orange", "^"), "multi_layer": ("tab:brown", "D"),
             "pattern": ("goldenrod", "P"), "adaptive": ("tab:pink", "X")}  # fmt: skip
_BASELINE_ROLES = ("bound: chance", "bound: perfect", "prior")
_HEURISTIC_COLOURS = ("tab:orange", "tab:brown", "goldenrod", "tab:pink", "sienna", "darkorange")
_KIND_COLOURS = {"contextual": "tab:blue", "transformer": "tab:green", "hierarchical": "tab:cyan",
                 "probe": "teal"}  # fmt: skip
_MARKERS = ("o", "s", "D", "^", "P", "X")
_RUN_MARKERS = ("s", "D", "^", "v", "<", ">", "P", "X", "h", "p", "d", "8")
_SHADES = (0.0, -0.35, 0.35)  # the kind's colour, darker, lighter
_ROUTER_BASELINE_STYLE = {"color": "tab:purple", "marker": "s", "linestyle": "-.", "linewidth": 1.6}  # gate_lookahead


def method_style(method: str, role: str, kind: str, seeds: int = 1) -> dict[str, object]:
    """matplotlib line keywords for a method, determined by its name, role and kind alone (so a method looks the
    same in every figure, whatever else is plotted beside it)."""
    pick = zlib.crc32(method.encode())  # stable across runs, unlike hash()
    if role in _BASELINE_ROLES:
        colour, marker = _BUILT_IN.get(method, ("0.4", _MARKERS[pick % 6]))
        return {"color": colour, "marker": marker, "linestyle": "--", "linewidth": 1.2}
    if role == "heuristic":
        colour, marker = _BUILT_IN.get(method, (_HEURISTIC_COLOURS[pick % 6], _MARKERS[pick % 6]))
        return {"color": colour, "marker": marker, "linestyle": ":", "linewidth": 1.4}
    if role == "router baseline":
        return dict(_ROUTER_BASELINE_STYLE)
    colour = _KIND_COLOURS.get(kind) or matplotlib.colormaps["winter"]((zlib.crc32(kind.encode()) % 97) / 97)
    if seeds > 1:  # a seed mean: the kind's own colour, bold
        return {"color": colour, "marker": "o", "linestyle": "-", "linewidth": 2.6}
    # Single runs of one kind (a sweep, an ablation) share its hue and differ in shade and marker: 3 x 12 looks.
    shade = _SHADES[(pick // len(_RUN_MARKERS)) % len(_SHADES)]
    rgb = np.array(to_rgb(colour))
    rgb = rgb * (1 + shade) if shade < 0 else rgb + (1 - rgb) * shade  # darker towards black, lighter towards white
    return {"color": tuple(rgb), "marker": _RUN_MARKERS[pick % len(_RUN_MARKERS)], "linestyle": "-", "linewidth": 1.4}


def accuracy_vs_lookahead(aggregate: pd.DataFrame, budget: int) -> Figure:
    """Top-1 accuracy (with its bootstrap CI) and recall@B vs lookahead d, one line per method, the legend
    outside the axes."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for method, rows in aggregate.groupby("method", sort=False):
        rows = rows.sort_values("lookahead")
        first = rows.iloc[0]  # metrics.csv's role, kind and seeds are the same in every row of a method
        style = method_style(str(method), str(first["role"]), str(first["kind"]), int(first["seeds"]))
        axes[0].plot(rows["lookahead"], rows["top1_acc"], label=method, **style)
        axes[0].fill_between(
            rows["lookahead"], rows["top1_ci_low"], rows["top1_ci_high"], color=style["color"], alpha=0.12
        )
        axes[1].plot(rows["lookahead"], rows["recall_at_budget"], label=method, **style)
    axes[0].set_ylabel("top-1 accuracy (95 % CI over documents)")
    axes[1].set_ylabel(f"recall@{budget}")
    for ax in axes:
        ax.set_xlabel("lookahead d (layers ahead)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted(aggregate["lookahead"].unique()))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    return fig


def reliability_diagrams(
    reliability: dict[str, dict], methods: list[str], lookahead: int, ece: Mapping[str, float] | None = None
) -> Figure:
    """Top-1 accuracy per confidence bin (bars; a calibrated method sits on the diagonal) and each bin's share of
    the tokens (outline), one panel per method; ``ece`` (by method) goes in the panel titles."""
    shown = [m for m in methods if f"{m}/d{lookahead}" in reliability]
    columns = max(min(len(shown), 5), 1)
    rows = max(int(np.ceil(len(shown) / columns)), 1)
    fig = Figure(figsize=(2.8 * columns, 2.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for ax, method in zip(axes.flat, shown, strict=False):
        bins = reliability[f"{method}/d{lookahead}"]
        count = np.asarray(bins["count"], dtype=float)
        edges = np.linspace(0, 1, len(count) + 1)
        accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
        ax.bar(edges[:-1], accuracy, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.8,
               edgecolor="k", linewidth=0.4)  # fmt: skip
        ax.stairs(count / max(count.sum(), 1), edges, color="k", linewidth=1)
        ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls="--")
        said = f"n = {int(count.sum()):,}" + ("" if ece is None or method not in ece else f", ECE {ece[method]:.3f}")
        ax.set_title(f"{method}\n{said}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.supxlabel("confidence")
    fig.supylabel("top-1 accuracy (bars) / token share (outline)")
    fig.suptitle(f"reliability at lookahead d = {lookahead} ({len(edges) - 1 if shown else 0} equal-width "
                 "confidence bins; n = tokens scored)")  # fmt: skip
    fig.tight_layout()
    return fig


def layer_accuracy_heatmap(per_layer: pd.DataFrame, lookahead: int) -> Figure:
    """Methods x source layer top-1 accuracy at one lookahead."""
    table = per_layer[per_layer["lookahead"] == lookahead].pivot(
        index="method", columns="source_layer", values="top1_acc"
    )
    order = list(dict.fromkeys(per_layer["method"]))
    table = table.reindex([m for m in order if m in table.index])
    table = table[sorted(table.columns, key=lambda name: int(str(name).split(".")[-1]))]
    fig = Figure(figsize=(1.1 * len(table.columns) + 3, 0.45 * len(table) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(table.columns)), labels=table.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(table)), labels=table.index)
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black"
            )
    ax.set_xlabel("source layer l (prediction made here)")
    ax.set_title(f"top-1 accuracy for layer l + {lookahead}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _policy_label(row: pd.Series) -> str:
    parts = [row["policy"]] + ([row["predictor"]] if row["predictor"] and row["predictor"] != row["policy"] else [])
    return " / ".join(parts) + (f" B={row['budget']}" if row["lookahead"] > 0 else "")


def latency_breakdown(table: pd.DataFrame, fraction: float, lookahead: int) -> Figure:
    """Compute vs stall per token for every policy (LRU eviction) at one cache size and lookahead."""
    rows = table[
        (table["cache_fraction"] == fraction) & (table["eviction"] == "lru") & table["lookahead"].isin([0, lookahead])
    ]
    labels = [_policy_label(row) for _, row in rows.iterrows()]
    fig = Figure(figsize=(9.5, 0.38 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, rows["compute_ms_per_token"], color="tab:blue", label="compute")
    stall = rows["stall_ms_per_token"]
    ax.barh(y, stall, left=rows["compute_ms_per_token"], color="tab:red", label="stall on expert copies")
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(f"latency per token: cache {fraction:.0%}, lookahead {lookahead}, LRU eviction")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


# One look per simulated policy, the same in every figure: the references grey/black dashed, gate-lookahead purple
# as in the accuracy figures, each predictor-driven policy a colour and marker of its own.
_POLICY_STYLES = {
    "on_demand": {"color": "0.5", "marker": "x", "linestyle": "--", "linewidth": 1.2},
    "oracle": {"color": "0.1", "marker": "*", "linestyle": "--", "linewidth": 1.2},
    "gate_lookahead": _ROUTER_BASELINE_STYLE,  # the policy looks like the method that drives it
    "predictor_topb": {"color": "tab:blue", "marker": "o", "linestyle": "-", "linewidth": 1.4},
    "predictor_confidence": {"color": "tab:cyan", "marker": "v", "linestyle": "-", "linewidth": 1.4},
    "cost_aware": {"color": "tab:green", "marker": "D", "linestyle": "-", "linewidth": 1.6},
    "cost_aware_multi": {"color": "tab:red", "marker": "P", "linestyle": "-", "linewidth": 2.2},
}


def policy_style(policy: str, eviction: str) -> dict[str, object]:
    """matplotlib line keywords for a simulated policy; on-demand with another eviction than LRU is dotted."""
    style = dict(_POLICY_STYLES.get(policy, {"color": "tab:olive", "marker": "h", "linestyle": "-"}))
    if policy == "on_demand" and eviction != "lru":
        style["linestyle"] = ":"
    return style


def cache_sweep(lines: pd.DataFrame, fraction: float, lookahead: int) -> Figure:
    """ms/token and hit rate vs cache fraction, one line per policy (``speculation.cache.tables.sweep_lines``: each
    policy's configuration that is fastest at the headline ``fraction``), the legend outside the axes."""
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for label, line in lines.groupby("label", sort=False):
        style = policy_style(str(line["policy"].iloc[0]), str(line["eviction"].iloc[0]))
        for ax, column in zip(axes, ("ms_per_token", "hit_rate"), strict=True):
            ax.plot(line["cache_fraction"], line[column], ms=4, label=label, **style)
    axes[0].set_ylabel("ms per token")
    axes[1].set_ylabel("hit rate (expert resident when its layer runs)")
    for ax in axes:
        ax.set_xlabel("cache fraction (share of all experts on the GPU)")
        ax.axvline(fraction, color="0.8", linewidth=0.8, zorder=0)
        ax.grid(alpha=0.3)
    title = f"each policy's fastest predictor, eviction\nand budget at cache {fraction:.0%} (grey line)"
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title, title_fontsize=8)
    fig.suptitle(f"prefetch policies vs cache size (lookahead {lookahead})")
    return fig
