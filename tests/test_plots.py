"""Figures a paper can use: one look per method in every figure, legends outside the data, reliability panels
that say their ECE and token count, PNG and PDF."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import rgb_to_hsv, to_rgba

from speculation.cache.tables import sweep_lines
from speculation.evaluation.tables import ROLES, role
from speculation.plots import (
    accuracy_vs_lookahead,
    cache_sweep,
    latency_breakdown,
    method_style,
    reliability_diagrams,
    save_figure,
)

TRAINED = ["contextual-seed0", "transformer-seed0", "hierarchical-seed0", "probe-seed0"]


def aggregate(methods: list[str]) -> pd.DataFrame:
    rows = []
    for i, method in enumerate(methods):
        for d in (1, 2, 3):
            top1 = 0.1 + 0.05 * i
            rows.append({"method": method, "role": role(method), "kind": method.split("-")[0], "seeds": 1,
                         "lookahead": d, "top1_acc": top1, "top1_ci_low": top1 - 0.01, "top1_ci_high": top1 + 0.01,
                         "recall_at_budget": top1 + 0.1})  # fmt: skip
    return pd.DataFrame(rows)


def line_looks(fig) -> dict[str, tuple]:
    return {line.get_label(): (to_rgba(line.get_color()), line.get_marker(), line.get_linestyle())
            for line in fig.axes[0].get_lines()}  # fmt: skip


def test_every_built_in_method_and_kind_has_its_own_look():
    methods = [*ROLES, *TRAINED]
    looks = {m: method_style(m, role(m), m.split("-")[0]) for m in methods}
    pairs = {(to_rgba(s["color"]), s["marker"]) for s in looks.values()}
    assert len(pairs) == len(methods)  # e.g. random and hierarchical no longer share a colour
    for method in ("random", "oracle", "frequency", "previous_token"):
        red, green, blue, _ = to_rgba(looks[method]["color"])
        assert looks[method]["linestyle"] == "--" and red == green == blue  # baselines: grey, dashed
    assert len({to_rgba(looks[m]["color"]) for m in TRAINED}) == len(TRAINED)
    assert method_style("transformer", "trained", "transformer", seeds=3)["linewidth"] > looks[TRAINED[1]]["linewidth"]


def test_a_method_looks_the_same_whatever_is_plotted_beside_it():
    everything = line_looks(accuracy_vs_lookahead(aggregate([*ROLES, *TRAINED]), 2))
    alone = line_looks(accuracy_vs_lookahead(aggregate(["hierarchical-seed0", "random"]), 2))
    assert alone["hierarchical-seed0"] == everything["hierarchical-seed0"]
    assert alone["random"] == everything["random"] and alone["random"] != alone["hierarchical-seed0"]


def simulation_table() -> pd.DataFrame:
    rows = [(policy, predictor, budget, lookahead, fraction)
            for policy, predictor, budget, lookahead in [("on_demand", "", 0, 0), ("predictor_topb", "probe", 1, 2),
                                                         ("oracle", "", 1, 2)]
            for fraction in (0.25, 0.5)]  # fmt: skip
    table = pd.DataFrame(rows, columns=["policy", "predictor", "budget", "lookahead", "cache_fraction"])
    return table.assign(eviction="lru", seeds=1, ms_per_token=1.5, hit_rate=0.6, compute_ms_per_token=1.0,
                        stall_ms_per_token=0.5)  # fmt: skip


@pytest.mark.parametrize("figure", ["accuracy", "cache_sweep", "latency_breakdown"])
def test_the_legend_sits_outside_the_axes(figure):
    fig = {
        "accuracy": lambda: accuracy_vs_lookahead(aggregate(["random", "transformer-seed0"]), 2),
        "cache_sweep": lambda: cache_sweep(sweep_lines(simulation_table(), 0.5, 2), 0.5, 2),
        "latency_breakdown": lambda: latency_breakdown(simulation_table(), 0.5, 2),
    }[figure]()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    fig.draw_without_rendering()  # runs the constrained layout
    legend = fig.legends[0].get_window_extent()
    assert all(legend.x0 >= ax.get_window_extent().x1 for ax in fig.axes)  # right of every panel


def test_reliability_panels_say_their_ece_and_token_count():
    bins = {"count": [0] * 13 + [30, 10], "accuracy": [np.nan] * 13 + [0.9, 1.0]}
    fig = reliability_diagrams({"probe-seed0/d1": bins}, ["probe-seed0"], 1, {"probe-seed0": 0.0123})
    assert fig.axes[0].get_title() == "probe-seed0\nn = 40, ECE 0.012"
    assert "15 equal-width confidence bins" in fig._suptitle.get_text()


def test_save_figure_writes_png_and_pdf(tmp_path):
    path = save_figure(accuracy_vs_lookahead(aggregate(["random"]), 2), tmp_path / "figures" / "a.png")
    assert path.read_bytes().startswith(b"\x89PNG") and path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pdf", "a.png"]  # no temporary file left


def test_the_cache_sweep_draws_each_policy_once_with_its_fastest_configuration_at_the_headline():
    # Hand-made: two predictors and two budgets for top-B, probe fastest at 50 % but not at 25 %; Belady faster still
    rows = [
        ("on_demand", "", 1, "lru", 0, 0.25, 3.0),
        ("on_demand", "", 1, "lru", 0, 0.5, 2.0),
        ("on_demand", "", 1, "belady", 0, 0.5, 1.0),
        ("predictor_topb", "probe", 1, "lru", 2, 0.25, 2.0),
        ("predictor_topb", "probe", 1, "lru", 2, 0.5, 1.2),
        ("predictor_topb", "probe", 2, "lru", 2, 0.5, 1.4),
        ("predictor_topb", "probe", 2, "lru", 2, 0.25, 1.0),
        ("predictor_topb", "transformer", 1, "lru", 2, 0.5, 1.3),
        ("predictor_topb", "transformer", 1, "lru", 2, 0.25, 1.9),
        ("predictor_topb", "probe", 1, "lru", 3, 0.5, 0.5),
    ]  # another lookahead: not this figure's
    table = pd.DataFrame(rows, columns=["policy", "predictor", "budget", "eviction", "lookahead", "cache_fraction",
                                        "ms_per_token"]).assign(seeds=1, hit_rate=0.5)  # fmt: skip
    lines = sweep_lines(table, 0.5, 2)
    assert sorted(lines["label"].unique()) == ["on_demand/lru", "predictor_topb/probe/lru/B1"]
    topb = lines[lines["policy"] == "predictor_topb"]
    assert topb["cache_fraction"].tolist() == [0.25, 0.5] and topb["ms_per_token"].tolist() == [2.0, 1.2]
    fig = cache_sweep(lines, 0.5, 2)
    drawn = {
        line.get_label(): line.get_color() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")
    }
    assert drawn == {"on_demand/lru": "0.5", "predictor_topb/probe/lru/B1": "tab:blue"}  # the policy's fixed colour


def test_single_runs_of_one_kind_share_its_hue_but_not_a_look():
    # the loss-ablation preset's eight transformer runs: one kind, so one family, each run its own shade and marker
    runs = ["transformer-seed0", *(f"transformer-loss={v}-seed0" for v in ("default", "no_confidence", "no_diversity",
            "routing_only", "kl_routing", "miss_weighted", "consistency"))]  # fmt: skip
    looks = [method_style(run, "trained", "transformer") for run in runs]
    assert len({(to_rgba(s["color"]), s["marker"]) for s in looks}) == len(runs)
    hue = rgb_to_hsv(to_rgba("tab:green")[:3])[0]
    for style in looks:  # a shade of the kind's colour: scaled towards black or mixed with white, same hue
        assert rgb_to_hsv(to_rgba(style["color"])[:3])[0] == pytest.approx(hue)
