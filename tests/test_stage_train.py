"""The train stage as its console script runs it: Hydra sweeps give one distinct predictor per point, and jobs
that a launcher runs at once split the cores between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_TRAIN
from safetensors.torch import load_file

from speculation.config.stages import default_run_name
from speculation.environment import available_cores
from speculation.workdir import IDENTITY_FILE, METRICS_FILE, PREDICTOR_FILE, WEIGHTS_FILE, Workdir

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
REPO = Path(__file__).parents[1]


def spec_train(*overrides: str) -> None:
    command = [sys.executable, "-m", "train.main", "-m", *overrides]
    subprocess.run(command, check=True, env=ENV, cwd=REPO, capture_output=True)


def test_a_sweep_of_two_seeds_yields_two_predictor_dirs(workdir, tmp_path):
    spec_train(f"workdir={workdir}", *TINY_TRAIN, "seed=0,1", "run_name=sweep-${seed}",
               f"hydra.sweep.dir={tmp_path}/multirun")  # fmt: skip
    runs = [Workdir(workdir).run(f"sweep-{seed}") for seed in (0, 1)]
    assert all((run / PREDICTOR_FILE).exists() for run in runs)
    a, b = (load_file(run / WEIGHTS_FILE) for run in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different seeds, different models


def test_a_sweep_over_a_loss_weight_names_one_run_per_value(workdir):
    """Without run_name, each value gets its own run (named from the overrides that change the result), trained
    with its own weight: not one run reused twice."""
    spec_train(f"workdir={workdir}", *TINY_TRAIN, "predictor=probe", "loss.confidence=0,0.5")
    (sweep,) = (Path(workdir) / "logs" / "multirun").iterdir()  # the sweep's logs: under the workdir, one per job
    assert sorted(job.name for job in sweep.iterdir() if (job / ".hydra" / "overrides.yaml").is_file()) == ["0", "1"]
    runs = {}
    for value in ("0", "0.5"):
        name = default_run_name("probe", 0, [*TINY_TRAIN, f"loss.confidence={value}"])
        assert name.startswith("probe-") and name.endswith("-seed0") and "logger" not in name
        runs[value] = Workdir(workdir).run(name)
        assert json.loads((runs[value] / IDENTITY_FILE).read_text())["loss.confidence"] == float(value)
        assert (runs[value] / PREDICTOR_FILE).exists()
    assert len(set(runs.values())) == 2
    a, b = (load_file(run / WEIGHTS_FILE) for run in runs.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the confidence term changed what was learned


def test_two_jobs_of_the_local_launcher_each_get_half_the_cores(workdir, tmp_path):
    spec_train(f"workdir={workdir}", *TINY_TRAIN, "predictor=probe", "seed=0,1", "hydra/launcher=local",
               f"hydra.sweep.dir={tmp_path}/multirun")  # fmt: skip
    for seed in (0, 1):
        run = Workdir(workdir).run(default_run_name("probe", seed, TINY_TRAIN))
        metrics = json.loads((run / METRICS_FILE).read_text())
        assert metrics["environment"]["threads"] == max(1, available_cores() // 2)
