"""Numbers that can be traced: every metrics.json and report records the commit, libraries and machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from speculation.environment import REPOSITORY, describe, environment
from speculation.workdir import METRICS_FILE, REPORT_FILE, Workdir


def test_the_environment_names_this_checkout_these_libraries_and_this_process():
    env = environment()
    head = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert env["git_dirty"] in ((True, False) if env["git_commit"] else (None,))
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cores"] >= 1
    json.dumps(env)  # JSON-ready as it is


def test_describe_is_one_line_with_commit_versions_and_machine():
    env = {"git_commit": "0123456789abcdef", "git_dirty": True, "package": "0.1.0", "python": "3.11.7",
           "torch": "2.13.0", "numpy": "2.4.6", "transformers": None, "hydra-core": "1.3.8", "pandas": "3.1.1",
           "cpu": "AMD EPYC", "cores": 2, "threads": 1, "gpu": None}  # fmt: skip
    assert describe(env) == (
        "commit 0123456789ab (dirty); Python 3.11.7, torch 2.13.0, numpy 2.4.6, hydra-core 1.3.8, pandas 3.1.1; "
        "on AMD EPYC (2 cores, 1 torch threads)"
    )
    assert describe(env | {"git_commit": None, "gpu": "H200"}).startswith("package 0.1.0;")
    assert describe(env | {"gpu": "H200"}).endswith("threads), H200")


def test_runs_and_reports_record_it(trained: Path, evaluated):
    run = next(p for p in Workdir(trained).predictors.iterdir() if (p / METRICS_FILE).exists())
    recorded = json.loads((run / METRICS_FILE).read_text())["environment"]
    assert recorded["git_commit"] == environment()["git_commit"] and recorded["torch"] == torch.__version__
    workdir, _ = evaluated
    report = (Workdir(workdir).eval() / REPORT_FILE).read_text()
    assert "Traced corpus: `stdlib`" in report and f"Python {environment()['python']}" in report
    metrics = json.loads((Workdir(workdir).eval() / "metrics.json").read_text())
    assert metrics["environment"]["cpu"] == environment()["cpu"] and metrics["corpus"]["documents"] > 0
