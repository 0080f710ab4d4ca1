"""What made a number: the code (git commit, dirty or not), the libraries and the machine.

Every ``metrics.json``, ``report.md`` and W&B run records :func:`environment`, so a result read later (or on
another machine) says which commit, versions and hardware produced it. Bitwise reproducibility holds on one machine
and one thread count, not across machines: two machines train the same config to the same loss along different
floating-point paths, so compare results across commits and machines through these fields, not by eye.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "numpy", "transformers", "hydra-core", "pandas")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: what SLURM or taskset grant), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None for both outside a git checkout, e.g.
    a wheel install; then the package version is all there is)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "package": _version("moe-speculation")}  # fmt: skip


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Commit, library versions, CPU (cores, torch threads) and GPU of this process, as JSON-ready values."""
    import torch  # here: the console scripts import this package before Hydra parses the command line

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        **code_version(),
        "python": platform.python_version(),
        **{library: _version(library) for library in LIBRARIES},
        "cpu": cpu_name(),
        "cores": available_cores(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def describe(env: dict[str, Any]) -> str:
    """One line for a report: ``commit 1a2b3c4 (dirty), torch 2.13.0, ... on <cpu> (2 cores, 2 threads)``."""
    commit = env.get("git_commit")
    code = (
        f"commit {commit[:12]}{' (dirty)' if env.get('git_dirty') else ''}"
        if commit
        else f"package {env.get('package')}"
    )
    libraries = ", ".join(f"{name} {env[name]}" for name in LIBRARIES if env.get(name))
    where = f"{env['cpu']} ({env['cores']} cores, {env['threads']} torch threads)"
    if env.get("gpu"):
        where += f", {env['gpu']}"
    return f"{code}; Python {env['python']}, {libraries}; on {where}"
