"""The evaluation's tables (``speculation.evaluation.report``): metrics.csv's columns, seed means with a t
interval, the per-lookahead table and its markdown, the headline's best method, on hand-made rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from speculation.evaluation.report import COLUMNS, IDENTITY, metrics_frame, render_lookahead_table, seed_means
from speculation.evaluation.runner import EvaluationResult
from speculation.evaluation.tables import gains, labels, lookahead_table, per_layer, read_metrics, role

IDENTITY_VALUES = {column: f"<{column}>" for column in IDENTITY}


def rows(values: list[tuple[str, int, float]]) -> pd.DataFrame:
    out = []
    for method, lookahead, accuracy in values:
        row = dict.fromkeys(COLUMNS, 0.0)
        row.update(IDENTITY_VALUES, method=method, kind=method.split("-")[0], role=role(method), seeds=1,
                   run=method if role(method) == "trained" else None, lookahead=lookahead, pooled=True, layer=None,
                   source_layer=None, target_layer=None, top1_acc=accuracy, top1_ci_low=accuracy - 0.01,
                   top1_ci_high=accuracy + 0.01)  # fmt: skip
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS).astype({"layer": "Int64"})


def test_metrics_csv_has_identity_kind_run_and_a_numeric_layer_with_a_pooled_flag(tmp_path):
    metric_values = dict.fromkeys(COLUMNS[COLUMNS.index("top1_acc") :], 0.5)
    result_rows = [
        {"method": "ctx-seed0", "lookahead": 1, "pooled": True, "layer": None, "source_layer": None,
         "target_layer": None, **metric_values},
        {"method": "ctx-seed0", "lookahead": 1, "pooled": False, "layer": 1, "source_layer": "decoder.3",
         "target_layer": "decoder.5", **metric_values},
        {"method": "random", "lookahead": 1, "pooled": False, "layer": 0, "source_layer": "decoder.1",
         "target_layer": "decoder.3", **metric_values},
    ]  # fmt: skip
    result = EvaluationResult(rows=result_rows, reliability={}, tokens=1, seconds=1.0)
    frame = metrics_frame(result, {"random": "random", "ctx-seed0": "contextual"}, IDENTITY_VALUES)
    assert list(frame.columns) == COLUMNS and (frame[IDENTITY] == pd.Series(IDENTITY_VALUES)).all().all()
    assert frame["method"].tolist() == ["random", "ctx-seed0", "ctx-seed0"]  # kinds' order, then the pooled row last
    assert frame["kind"].tolist() == ["random", "contextual", "contextual"]
    assert frame["run"].isna().tolist() == [True, False, False] and (frame["seeds"] == 1).all()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    frame.to_csv(eval_dir / "metrics.csv", index=False)
    (eval_dir / "metrics.json").write_text("{}")
    back, _ = read_metrics(eval_dir)
    assert back["pooled"].dtype == bool and back["layer"].dtype == "Int64"
    assert back["layer"].isna().tolist() == [False, False, True] and per_layer(back)["layer"].tolist() == [0, 1]


def test_seeds_of_one_predictor_are_averaged_with_a_t_interval():
    frame = rows([("ctx-seed0", 1, 0.5), ("ctx-seed1", 1, 0.6), ("ctx-seed2", 1, 0.7), ("solo", 1, 0.1)])
    out = seed_means(frame, {"ctx-seed0": "ctx", "ctx-seed1": "ctx", "ctx-seed2": "ctx", "solo": "solo"})
    mean = out[out["method"] == "ctx"].iloc[0]
    half_width = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd of [0.5, 0.6, 0.7] = 0.1
    assert mean["seeds"] == 3 and pd.isna(mean["run"]) and mean["kind"] == "ctx" and mean["role"] == "trained"
    assert mean["top1_acc"] == pytest.approx(0.6)
    assert mean["top1_ci_low"] == pytest.approx(0.6 - half_width)
    assert mean["top1_ci_high"] == pytest.approx(0.6 + half_width)
    assert (out[IDENTITY] == pd.Series(IDENTITY_VALUES)).all().all()  # seed rows keep the identity columns
    assert "solo" not in set(out.loc[out["seeds"] > 1, "method"])  # a single run gets no seed row
    assert labels(out)[-1] == "ctx (3 seeds)"


def test_the_best_method_is_a_seed_mean_not_its_luckiest_seed():
    frame = rows([("pattern", 1, 0.3), ("gate_lookahead", 1, 0.55), ("oracle", 1, 1.0), ("ctx-seed0", 1, 0.5),
                  ("ctx-seed1", 1, 0.9), ("solo-seed0", 1, 0.6)])  # fmt: skip
    frame = seed_means(frame, {"ctx-seed0": "ctx", "ctx-seed1": "ctx", "solo-seed0": "solo"})
    best = gains(frame).loc[1]
    assert best["best_method"] == "ctx (2 seeds)" and best["top1_acc"] == pytest.approx(0.7)  # not ctx-seed1's 0.9
    assert best["top1 vs gate_lookahead"] == pytest.approx(0.15)
    assert best["top1 vs best heuristic"] == pytest.approx(0.4)


def test_the_lookahead_table_keeps_one_lookahead_and_renders_its_interval():
    frame = rows([("random", 1, 0.125), ("random", 2, 0.124), ("oracle", 1, 1.0)])
    table = lookahead_table(frame, 1)
    assert table["method"].tolist() == ["random", "oracle"] and table["top1_acc"].tolist() == [0.125, 1.0]
    header, _, random_row, _ = (
        [cell.strip() for cell in line.split("|")[1:-1]] for line in render_lookahead_table(table, 2).splitlines()
    )
    assert header[:5] == ["method", "top-1 [95 % CI]", "recall@2", "top-1 on misses", "recall@2 on misses"]
    assert len(header) == 12
    assert random_row[:3] == ["random", "0.125 [0.115, 0.135]", "0.000"]


def test_a_split_of_few_documents_is_warned_about_and_a_large_one_is_not():
    from speculation.evaluation.report import MIN_DOCUMENTS_FOR_INTERVALS, few_documents_warning

    assert few_documents_warning(MIN_DOCUMENTS_FOR_INTERVALS) == []
    (warning, blank) = few_documents_warning(7)
    assert warning.startswith("**Warning: only 7 held-out documents.**") and blank == ""
    assert few_documents_warning(1)[0].startswith("**Warning: only 1 held-out document.**")


def test_without_a_bootstrap_the_top1_cell_is_the_value_alone_not_nan():
    from types import SimpleNamespace

    from speculation.evaluation.report import bootstrap_wording, with_interval

    assert with_interval(SimpleNamespace(top1_acc=0.8472, top1_ci_low=0.8381, top1_ci_high=0.856)) == (
        "0.847 [0.838, 0.856]"
    )
    assert with_interval(SimpleNamespace(top1_acc=0.8472, top1_ci_low=float("nan"), top1_ci_high=float("nan"))) == (
        "0.847"
    )
    assert bootstrap_wording(0).startswith("none") and "200 resamples" in bootstrap_wording(200)
