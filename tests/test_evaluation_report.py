"""The evaluation's tables (``speculation.evaluation.report``): seed means with a t interval, the per-lookahead
table and its markdown, on hand-made rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from speculation.evaluation.report import COLUMNS, render_lookahead_table, seed_means
from speculation.evaluation.tables import lookahead_table


def rows(values: list[tuple[str, int, float]]) -> pd.DataFrame:
    out = []
    for method, lookahead, accuracy in values:
        row = dict.fromkeys(COLUMNS, 0.0)
        row.update(method=method, lookahead=lookahead, layer="all", source_layer="all", target_layer="all",
                   top1_acc=accuracy, top1_ci_low=accuracy - 0.01, top1_ci_high=accuracy + 0.01)  # fmt: skip
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS)


def test_seeds_of_one_predictor_are_averaged_with_a_t_interval():
    frame = rows([("ctx-seed0", 1, 0.5), ("ctx-seed1", 1, 0.6), ("ctx-seed2", 1, 0.7), ("solo", 1, 0.1)])
    out = seed_means(frame, {"ctx-seed0": "ctx", "ctx-seed1": "ctx", "ctx-seed2": "ctx", "solo": "solo"})
    mean = out[out["method"] == "ctx (3 seeds)"].iloc[0]
    half_width = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd of [0.5, 0.6, 0.7] = 0.1
    assert mean["top1_acc"] == pytest.approx(0.6)
    assert mean["top1_ci_low"] == pytest.approx(0.6 - half_width)
    assert mean["top1_ci_high"] == pytest.approx(0.6 + half_width)
    assert not out["method"].str.startswith("solo (").any()  # a single run gets no seed row


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
