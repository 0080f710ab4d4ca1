"""What a stage takes from its Hydra job (``speculation.stages.job``) and how runs are named from it."""

from __future__ import annotations

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from speculation.config.stages import TrainConfig, default_run_name, learning_overrides, seed_group
from speculation.environment import available_cores
from speculation.stages.job import parallel_jobs, threads_per_job


def test_a_run_is_named_from_the_overrides_that_change_what_it_learns():
    command = ["workdir=/tmp/w", "logger=none", "threads=1", "train.lr=0.5", "seed=3", "predictor=contextual",
               "loss.confidence=0", "device=cpu", "train.overwrite=true", "run_name=null"]  # fmt: skip
    assert learning_overrides(command) == ["loss.confidence=0", "train.lr=0.5"]
    assert default_run_name("contextual", 3, command) == "contextual-loss.confidence=0,train.lr=0.5-seed3"
    assert default_run_name("probe", 0, ["workdir=/tmp/w", "logger=none"]) == "probe-seed0"  # the kind's defaults
    assert seed_group(default_run_name("probe", 2, ["loss.miss_weight=2"])) == "probe-loss.miss_weight=2"


def test_names_stay_one_path_component_and_bounded():
    assert default_run_name("probe", 0, ["+train.note=a/b c"]) == "probe-train.note=a_b_c-seed0"
    many = [f"train.k{i}={'x' * 20}" for i in range(20)]
    name = default_run_name("probe", 0, many)
    assert len(name) < 160 and "/" not in name
    assert name != default_run_name("probe", 0, many[:-1])  # the digest keeps long names apart


def test_train_config_uses_run_name_first_then_the_command_line():
    assert TrainConfig(run_name="mine").name == "mine"
    assert TrainConfig(seed=1, command_overrides=["loss.diversity=0"]).name == "contextual-loss.diversity=0-seed1"


@pytest.mark.parametrize(
    ("mode", "launcher", "jobs"),
    [
        (RunMode.RUN, {"n_jobs": 4}, 1),  # a single run is alone whatever the launcher says
        (RunMode.MULTIRUN, {}, 1),  # the basic launcher runs its jobs one after another
        (RunMode.MULTIRUN, {"n_jobs": 2}, min(2, available_cores())),
        (RunMode.MULTIRUN, {"n_jobs": -1}, available_cores()),  # joblib: one job per core
    ],
)
def test_parallel_jobs_come_from_the_launcher(mode, launcher, jobs):
    hydra_cfg = OmegaConf.create({"mode": mode, "launcher": launcher})
    assert parallel_jobs(hydra_cfg) == jobs
    assert threads_per_job(hydra_cfg) == max(1, available_cores() // jobs)
    assert parallel_jobs(None) == 1
