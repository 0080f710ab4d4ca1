"""Markdown from DataFrames (``speculation.markdown``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from speculation.markdown import to_markdown


def test_columns_are_formatted_missing_values_empty_and_text_never_reparsed():
    frame = pd.DataFrame({"method": ["a", "b"], "top1": [0.8705, np.nan], "speedup": [1.0, 1.25], "id": ["007", "1"]})
    lines = to_markdown(frame, {"top1": "{:.3f}", "speedup": lambda v: f"{v:.2f}x"}).splitlines()
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]
    assert cells[0] == ["method", "top1", "speedup", "id"]
    assert cells[2:] == [["a", "0.871", "1.00x", "007"], ["b", "", "1.25x", "1"]]


def test_a_missing_value_in_an_unformatted_column_is_blank_not_nan():
    # spec-compare: a workdir evaluated without the simulation has no best policy
    frame = pd.DataFrame({"workdir": ["a", "b"], "sim_best_policy": ["cost_aware/probe/lru/B2", np.nan]})
    lines = to_markdown(frame).splitlines()
    assert "nan" not in "\n".join(lines).lower()
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == ["b", ""]
