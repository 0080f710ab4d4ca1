"""Benchmark of thread budgeting: a two-job ``spec-train`` sweep run in a row, in parallel with ``threads=null``
(each job gets cores // 2 torch threads) and in parallel with every job taking all cores (oversubscribed).

    python benchmarks/parallel_sweep_bench.py --workdir outputs/default                # probe, 400 steps
    python benchmarks/parallel_sweep_bench.py --workdir outputs/default --kind transformer --steps 150

Each mode trains the same two runs (seeds 20 and 21, fresh names, removed afterwards); the modes alternate over
``--repeats`` rounds so machine noise hits all of them, and the median wall time per mode and the ratios to "in a
row" are reported. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import alternating_rounds, report

from speculation.environment import available_cores, cpu_name
from speculation.workdir import Workdir

BIN = Path(sys.executable).parent
MODES = {
    "in_a_row": [],  # Hydra's basic launcher: one job after the other, each with every core
    "parallel_budgeted": ["hydra/launcher=local"],  # threads=null: cores // n_jobs each
    "parallel_oversubscribed": ["hydra/launcher=local", f"threads={available_cores()}"],  # every job takes all cores
}


def sweep(workdir: Path, kind: str, steps: int, mode: str, tag: str, sweep_dir: Path) -> float:
    """Wall seconds of one two-job sweep in ``mode``."""
    command = [str(BIN / "spec-train"), "-m", f"workdir={workdir}", f"predictor={kind}", "seed=20,21",
               f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
               "logger=none", f"run_name=bench-{tag}-${{seed}}",
               f"hydra.sweep.dir={sweep_dir}/{tag}", *MODES[mode]]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    for seed in (20, 21):
        shutil.rmtree(Workdir(workdir).run(f"bench-{tag}-{seed}"), ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a workdir with traces (spec-collect)")
    parser.add_argument("--kind", default="probe")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    sweep_dir = args.workdir / "logs" / "parallel_sweep_bench"
    seconds = alternating_rounds(
        list(MODES), args.repeats,
        lambda mode, repeat: sweep(args.workdir, args.kind, args.steps, mode, f"{mode}-{repeat}", sweep_dir), "s",
    )  # fmt: skip
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    result = {
        "machine": f"{cpu_name()}, {available_cores()} cores, {platform.python_version()}",
        "kind": args.kind, "steps": args.steps, "jobs": 2, "seconds": seconds, "median_s": median,
        "ratio_to_in_a_row": {mode: median[mode] / median["in_a_row"] for mode in MODES},
    }  # fmt: skip
    report(result, args.out)


if __name__ == "__main__":
    main()
