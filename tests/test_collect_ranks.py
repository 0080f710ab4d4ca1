"""Rank-sharded collection under torchrun (gloo, 2 ranks on CPU): the trace store is byte-identical to one
process', every shard's sha256 and the manifest included, and a killed 2-rank run resumes to the same bytes.

Both runs trace the source model the ``collected`` fixture trained (its workdir copied, traces deleted), so the
manifest's source metrics (a training time among them) are the same by construction and any difference is the
tracing's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_COLLECT, compose_config, copy_workdir

from speculation.stages.collect import collect
from speculation.workdir import MANIFEST_FILE, TOKENS_FILE

pytestmark = pytest.mark.slow
THREADS = "threads=1"  # what each rank takes of this 2-core machine; the single-process reference takes the same


def digests(traces: Path) -> dict[str, str]:
    """sha256 of every file of a trace store, by path inside it."""
    return {
        str(path.relative_to(traces)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(traces.rglob("*"))
        if path.is_file()
    }


def collect_here(overrides: list[str]) -> None:
    """``spec-collect`` in this process at ``THREADS``, leaving torch's thread count as it was for later tests."""
    threads = torch.get_num_threads()
    try:
        collect(compose_config("collect", [*TINY_COLLECT, THREADS, *overrides]))
    finally:
        torch.set_num_threads(threads)


def untraced(collected: Path, target: Path) -> Path:
    """A copy of the fixture's workdir with its trained source model and without its traces."""
    copy_workdir(collected, target)
    shutil.rmtree(target / "traces")
    return target


def torchrun_collect(workdir: Path, *overrides: str, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "collect.main", *TINY_COLLECT, THREADS, *overrides, f"workdir={workdir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_rank(collected: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = untraced(collected, tmp_path_factory.mktemp("one-rank") / "work")
    collect_here([f"workdir={workdir}"])
    return workdir


def test_two_ranks_write_the_bytes_one_process_writes(one_rank: Path, collected: Path, tmp_path: Path):
    two = untraced(collected, tmp_path / "two")
    torchrun_collect(two)
    expected = digests(one_rank / "traces")
    manifest = json.loads((one_rank / "traces" / MANIFEST_FILE).read_text())
    assert all(len(entry["shards"]) >= 2 for entry in manifest["splits"].values())  # both ranks wrote shards
    assert digests(two / "traces") == expected
    assert list((two / "logs" / "collect").glob("*/rank-1/collect.log"))  # rank 1 ran, and logged on its own


def test_compact_traces_too(collected: Path, tmp_path: Path):
    """Stored gate-lookahead scores and a seeded projection, in bfloat16: every rank draws the same projection."""
    compact = ["trace.gate_lookahead=2", "trace.hidden_projection=8", "trace.hidden_dtype=bfloat16"]
    one, two = untraced(collected, tmp_path / "one"), untraced(collected, tmp_path / "two")
    collect_here([*compact, f"workdir={one}"])
    torchrun_collect(two, *compact)
    files = digests(one / "traces")
    assert "train/shard-00001/lookahead_logits.npy" in files and "hidden_projection.safetensors" in files
    assert digests(two / "traces") == digests(one / "traces")


def test_a_killed_two_rank_run_resumes_to_the_same_bytes(one_rank: Path, collected: Path, tmp_path: Path):
    """What a kill leaves: some shards complete, one half-written (``.tmp``), no tokens table, no manifest."""
    two = untraced(collected, tmp_path / "two")
    torchrun_collect(two)
    traces = two / "traces"
    (traces / MANIFEST_FILE).unlink()
    shutil.rmtree(traces / "train" / "shard-00001")  # rank 1's
    (traces / "val" / TOKENS_FILE).unlink()
    half = traces / "val" / "shard-00000.tmp"
    shutil.move(traces / "val" / "shard-00000", half)  # rank 0's, killed before its rename
    (half / "experts.npy").write_bytes(b"torn")
    torchrun_collect(two)
    assert digests(traces) == digests(one_rank / "traces")


def test_a_sweep_runs_each_job_under_torchrun(one_rank: Path, collected: Path, tmp_path: Path):
    """``hydra/launcher=torchrun_local``: what ``hydra/launcher=slurm`` runs on each node, through submitit's local
    executor; each job's 2 ranks write what one process writes."""
    workdirs = [untraced(collected, tmp_path / name) for name in ("a", "b")]
    command = [sys.executable, "-m", "collect.main", "-m", "hydra/launcher=torchrun_local", *TINY_COLLECT, THREADS,
               f"workdir={workdirs[0]},{workdirs[1]}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = digests(one_rank / "traces")
    for job, workdir in enumerate(workdirs):
        assert digests(workdir / "traces") == expected
        ranks_logs = tmp_path / "sweep" / str(job) / "torchrun"
        assert (ranks_logs / "collect.log").is_file() and (ranks_logs / "rank-1" / "collect.log").is_file()
