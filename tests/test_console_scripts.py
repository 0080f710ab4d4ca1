"""The console scripts' surface: ``--help`` describes the stage and its main keys, and neither ``--help`` nor tab
completion imports torch (they run before any stage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HEADERS = {
    "spec-collect": "spec-collect: train (or reload) the source MoE",
    "spec-train": "spec-train: fit one learned predictor",
    "spec-evaluate": "spec-evaluate: score every heuristic",
    "spec-pipeline": "spec-pipeline: every stage in order",
}


@pytest.mark.parametrize("script", sorted(HEADERS))
def test_help_describes_the_stage_its_keys_and_groups(script):
    done = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith(HEADERS[script]), done.stdout[:200]
    assert "Main keys:" in done.stdout and "workdir=DIR" in done.stdout
    assert "router: adaptive_k, capacity" in done.stdout  # the config groups, with their options
    assert f"{script} --cfg job" in done.stdout


def test_entry_points_and_completion_do_not_import_torch():
    probe = "import sys, collect.main, train.main, evaluate.main, pipeline.main; print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    env = {"COMP_LINE": "spec-train predictor=tra", "PATH": str(BIN)}
    completion = subprocess.run([str(BIN / "spec-train"), "-sc", "query=bash"], capture_output=True, text=True,
                                env=env, check=True)  # fmt: skip
    assert completion.stdout.split() == ["predictor=transformer"]
