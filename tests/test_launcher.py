"""The SLURM launcher's torchrun command per node (hydra_plugins/spec_torchrun_launcher): rendezvous from SLURM's
variables, this job's overrides, the ranks' log directory. The end-to-end run of a sweep under torchrun (submitit's
local executor) is in test_collect_ranks.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

import speculation.config  # noqa: F401  (registers the stage schemas the composition needs)
from hydra_plugins.spec_torchrun_launcher import launcher

TWO_NODES = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]",
             "SLURM_JOB_ID": "4711"}  # fmt: skip


def test_one_node_rendezvous_on_a_free_port():
    command = launcher.torchrun_command("train.main", 4, 29500, ["seed=1"], Path("/logs/3/torchrun"), {})
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       "-m", "train.main", "seed=1", "hydra.run.dir=/logs/3/torchrun${rank_dir:}"]  # fmt: skip


def test_every_node_of_a_job_meets_on_its_first_node(monkeypatch):
    monkeypatch.setattr(launcher, "first_node", lambda nodelist: {"gpu[03-04]": "gpu03"}[nodelist])
    command = launcher.torchrun_command("collect.main", 8, 29400, ["model=hf"], Path("/logs/0/torchrun"), TWO_NODES)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1",
                       "--rdzv-backend=c10d", "--rdzv-endpoint=gpu03:29400", "--rdzv-id=4711", "--nproc-per-node=8",
                       "-m", "collect.main", "model=hf",
                       "hydra.run.dir=/logs/0/torchrun/node-1${rank_dir:}"]  # fmt: skip


def test_the_slurm_preset_asks_for_a_gpu_per_rank_and_one_task_per_node():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.nproc_per_node=4", "hydra.launcher.nodes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        params = compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert params._target_ == "hydra_plugins.spec_torchrun_launcher.launcher.TorchrunSlurmLauncher"
    assert (params.gpus_per_node, params.tasks_per_node, params.nodes) == (4, 1, 2)


@pytest.mark.parametrize(("params", "match"), [({"tasks_per_node": 2}, "tasks_per_node=2"),
                                               ({"nproc_per_node": 0}, "nproc_per_node=0")])  # fmt: skip
def test_a_launcher_that_cannot_start_its_ranks_is_refused(tmp_path, params, match):
    keys = {"nproc_per_node": 2, "rdzv_port": 29500, "submitit_folder": str(tmp_path), **params}
    with pytest.raises(ValueError, match=match):
        launcher.TorchrunLocalLauncher(**keys)


def test_the_stage_module_is_named_also_when_run_with_python_m(monkeypatch):
    import collect.main

    assert launcher.stage_module(collect.main.main) == "collect.main"
