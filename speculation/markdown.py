"""Markdown rendered from DataFrames: the report's tables are the library's DataFrames, formatted, never re-derived."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

Format = str | Callable[[Any], str]  # a format spec ("{:.3f}") or a function of the value


def to_markdown(frame: pd.DataFrame, formats: Mapping[str, Format] | None = None) -> str:
    """``frame`` as a markdown table (pandas + tabulate), each column in ``formats`` formatted; NaN shows empty."""
    shown = frame.copy()
    for column, fmt in (formats or {}).items():
        render = fmt.format if isinstance(fmt, str) else fmt
        shown[column] = [("" if _missing(value) else render(value)) for value in shown[column]]
    shown = shown.astype(object).where(shown.notna(), "")  # unformatted columns too: a missing value is blank
    return shown.to_markdown(index=False, disable_numparse=True)  # the cells are formatted already


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))
