"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised before reading the clock)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, including any CUDA work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternating_rounds(
    modes: Sequence[str], repeats: int, measure: Callable[[str, int], float], unit: str
) -> dict[str, list[float]]:
    """``measure(mode, round)`` of every mode in every round, in reversed order every other round so that drifting
    machine noise hits every mode alike; each value is printed as it comes."""
    values: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in list(modes) if repeat % 2 == 0 else list(reversed(modes)):
            values[mode].append(measure(mode, repeat))
            print(f"round {repeat}: {mode}: {values[mode][-1]:.1f} {unit}", flush=True)
    return values


def report(result: dict, out: Path | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``out`` if given."""
    print(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
