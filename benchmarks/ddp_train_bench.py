"""Benchmark of data-parallel predictor training: the same ``spec-train`` run as 1 rank with every core's threads
and as ``torchrun`` ranks sharing the cores (each ``cores // ranks`` threads), side by side.

    python benchmarks/ddp_train_bench.py --workdir outputs/default                     # contextual, 200 steps
    python benchmarks/ddp_train_bench.py --workdir outputs/smoke --kind transformer --steps 100 --ranks 2

Each mode trains the same config under a fresh run name (removed afterwards); the modes alternate over ``--repeats``
rounds so machine noise hits both. Throughput is ``steps_run / train_time_s`` of the run's ``metrics.json``: the
training loop alone (its one validation included), not the processes' start-up. Reported: the median steps/s per
mode and the ratio ranks / 1 rank, with the threads each rank had. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from timing import alternating_rounds, report

from speculation.environment import available_cores, cpu_name
from speculation.workdir import METRICS_FILE, Workdir


def modes(ranks: int) -> dict[str, tuple[int, int]]:
    """Mode name -> (ranks, threads per rank): the same cores either way."""
    cores = available_cores()
    per_rank = max(1, cores // ranks)
    return {f"1_rank_x_{cores}_threads": (1, cores), f"{ranks}_ranks_x_{per_rank}_threads": (ranks, per_rank)}


def run(workdir: Path, args: argparse.Namespace, ranks: int, threads: int, tag: str) -> float:
    """Training steps per second of one run with ``ranks`` ranks of ``threads`` threads."""
    name = f"ddp-bench-{tag}"
    overrides = [f"workdir={workdir}", f"predictor={args.kind}", f"train.steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"train.eval_every={args.steps}",
                 f"train.checkpoint_every={args.steps}", "train.val_windows=32", "logger=none", f"threads={threads}",
                 f"run_name={name}", *args.overrides]  # fmt: skip
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]  # fmt: skip
    subprocess.run([*launcher, "-m", "train.main", *overrides], check=True, capture_output=True)
    run_dir = Workdir(workdir).run(name)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    shutil.rmtree(run_dir)
    return metrics["steps_run"] / metrics["train_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a workdir with traces (spec-collect)")
    parser.add_argument("--kind", default="contextual")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="more spec-train overrides (e.g. predictor.d_model=32)")
    args = parser.parse_args()
    plan = modes(args.ranks)
    rates = alternating_rounds(
        list(plan),
        args.repeats,
        lambda mode, repeat: run(args.workdir, args, *plan[mode], f"{mode}-{repeat}"),
        "steps/s",
    )
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    single, parallel = plan
    result = {
        "machine": f"{cpu_name()}, {available_cores()} cores, Python {platform.python_version()}",
        "kind": args.kind, "steps": args.steps, "batch_size": args.batch_size, "overrides": args.overrides,
        "modes": {mode: {"ranks": r, "threads_per_rank": t} for mode, (r, t) in plan.items()},
        "steps_per_s": rates, "median_steps_per_s": median,
        "ratio_ranks_to_1_rank": median[parallel] / median[single],
    }  # fmt: skip
    report(result, args.out)


if __name__ == "__main__":
    main()
