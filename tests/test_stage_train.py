"""The train stage as its console script runs it: a Hydra sweep of two seeds gives two distinct predictors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_TRAIN
from safetensors.torch import load_file

from speculation.workdir import PREDICTOR_FILE, WEIGHTS_FILE, Workdir


def test_a_sweep_of_two_runs_yields_two_predictor_dirs(workdir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "train.main", "-m", f"workdir={workdir}", *TINY_TRAIN, "seed=0,1",
               "run_name=sweep-${seed}", f"hydra.sweep.dir={tmp_path}/multirun"]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).parents[1], capture_output=True)
    runs = [Workdir(workdir).run(f"sweep-{seed}") for seed in (0, 1)]
    assert all((run / PREDICTOR_FILE).exists() for run in runs)
    a, b = (load_file(run / WEIGHTS_FILE) for run in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different seeds, different models
