"""Benchmark of rank-sharded collection: ``spec-collect`` in one process with every core, against ``torchrun``
with N ranks of ``cores // N`` threads each, on the same traces of an already trained source model.

    python benchmarks/collect_ranks_bench.py --workdir outputs/default
    python benchmarks/collect_ranks_bench.py --workdir outputs/smoke -- experiment=smoke trace.batches_per_shard=1

The overrides after ``--`` must be the ones the workdir was collected with (else its source model is retrained).

Each round copies the workdir without its traces (the source model and tokenizer are reloaded, not retrained),
so the wall time is what a user waits for: start-up, model load, tracing, and rank 0's summary and manifests. The
modes alternate over ``--repeats`` rounds so machine noise hits both; the median per mode, the tokens per second
and the ratio are reported, and the stores are compared byte for byte (within a mode, and across modes). Not a test:
nothing here asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import alternating_rounds, report

from speculation.environment import available_cores, cpu_name
from speculation.workdir import MANIFEST_FILE


def store_digest(traces: Path) -> str:
    """One sha256 over every file of a store (path and content), figures included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in traces.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(traces)).encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def commands(ranks: int, overrides: list[str]) -> dict[str, list[str]]:
    cores = available_cores()
    one = [sys.executable, "-m", "collect.main", *overrides, f"threads={cores}"]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "collect.main", *overrides, f"threads={max(1, cores // ranks)}"]  # fmt: skip
    return {"1 process": one, f"{ranks} ranks": many}


def collect_once(source: Path, command: list[str], scratch: Path) -> tuple[float, int, str]:
    """Wall seconds, traced tokens and the store's digest of one collection into a copy of ``source``."""
    workdir = scratch / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("traces", "logs", "predictors", "eval", "wandb"))
    started = time.perf_counter()
    subprocess.run([*command, f"workdir={workdir}", "logger=none"], check=True, capture_output=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    seconds = time.perf_counter() - started
    manifest = json.loads((workdir / "traces" / MANIFEST_FILE).read_text())
    tokens = sum(entry["rows"] for entry in manifest["splits"].values())
    return seconds, tokens, store_digest(workdir / "traces")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a workdir whose source model is trained")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="the collect config of the workdir (after --)")
    args = parser.parse_args()
    modes = commands(args.ranks, args.overrides)
    digests: dict[str, set[str]] = {mode: set() for mode in modes}
    tokens: list[int] = []
    with tempfile.TemporaryDirectory() as scratch:

        def measure(mode: str, repeat: int) -> float:
            wall, traced, digest = collect_once(args.workdir, modes[mode], Path(scratch))
            tokens.append(traced)
            digests[mode].add(digest)
            return wall

        seconds = alternating_rounds(list(modes), args.repeats, measure, "s")
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    one, many = medians.values()
    result = {
        "machine": f"{cpu_name()}, {available_cores()} cores ({platform.machine()})",
        "tokens": tokens[0],
        "threads": {mode: command[-1] for mode, command in modes.items()},
        "seconds": seconds,
        "median_s": medians,
        "tokens_per_s": {mode: tokens[0] / median for mode, median in medians.items()},
        "speedup": one / many,
        # Every round of a mode writes the same bytes; across modes only where the thread counts agree (float
        # reductions may round differently with another thread count: the ranks' shards are one process' at 1 thread).
        "repeatable_per_mode": all(len(found) == 1 for found in digests.values()),
        "identical_across_modes": len(set().union(*digests.values())) == 1,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
