"""Which rank a process is under torchrun (speculation.distributed), and what a rank takes of the machine."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from speculation.distributed import SINGLE_PROCESS, Ranks, launch_ranks, main_first, rank_device
from speculation.environment import available_cores
from speculation.errors import UserError
from speculation.stages.job import threads_per_job

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def torchrun_env(monkeypatch):
    """``torchrun_env(rank, world, local_rank, local_world)``: the variables torchrun sets for a worker."""
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(*values: int) -> None:
        for name, value in zip(TORCHRUN_ENV, values, strict=True):
            monkeypatch.setenv(name, str(value))

    return set_env


def test_a_plain_run_is_rank_0_of_1(torchrun_env):
    assert launch_ranks() == SINGLE_PROCESS == Ranks(0, 1, 0, 1)
    assert SINGLE_PROCESS.is_main and all(SINGLE_PROCESS.owns(i) for i in range(5))


def test_torchrun_variables_are_read(torchrun_env):
    torchrun_env(3, 4, 1, 2)
    assert launch_ranks() == Ranks(rank=3, world=4, local_rank=1, local_world=2)
    assert not launch_ranks().is_main


def test_shards_are_dealt_round_robin_and_every_one_has_one_owner():
    world = 3
    owners = [[r for r in range(world) if Ranks(r, world).owns(i)] for i in range(8)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0], [1]]


@pytest.mark.parametrize(("values", "bad"), [((2, 2, 0, 2), "rank 2 of 2"), ((0, 2, 5, 2), "local 5 of 2")])
def test_an_impossible_place_is_one_clear_error(torchrun_env, values, bad):
    torchrun_env(*values)
    with pytest.raises(UserError, match=bad):
        launch_ranks()


def test_non_integer_variables_are_one_clear_error(torchrun_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match=r"not integers.*torchrun"):
        launch_ranks()


def test_ranks_of_one_machine_share_its_cores(torchrun_env):
    torchrun_env(1, 2, 1, 2)
    assert threads_per_job(None) == max(1, available_cores() // 2)


def test_a_cuda_rank_takes_the_gpu_of_its_local_rank():
    assert rank_device(torch.device("cuda"), Ranks(3, 4, 1, 2)) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda", 0), Ranks(3, 4, 1, 2)) == torch.device("cuda", 0)  # asked for by name
    assert rank_device(torch.device("cpu"), Ranks(3, 4, 1, 2)) == torch.device("cpu")
    assert rank_device(torch.device("cuda"), SINGLE_PROCESS) == torch.device("cuda")


def test_main_first_runs_the_body_once_without_a_group():
    ran = []
    with main_first(SINGLE_PROCESS):
        ran.append(1)
    assert ran == [1]


def test_ranks_other_than_0_log_in_a_rank_directory_of_their_own(torchrun_env):
    import speculation.config  # noqa: F401  (registers the resolver Hydra's run dir uses)

    run_dir = OmegaConf.create({"dir": "logs/collect/t${rank_dir:}"})
    assert run_dir.dir == "logs/collect/t"
    torchrun_env(1, 2, 1, 2)
    assert OmegaConf.create({"dir": "logs/collect/t${rank_dir:}"}).dir == "logs/collect/t/rank-1"


def test_evaluate_refuses_to_run_as_one_rank_of_many_before_any_work(torchrun_env, tmp_path):
    from speculation.stages.evaluate import evaluate

    torchrun_env(1, 2, 1, 2)
    with pytest.raises(UserError, match=r"one process, not as rank 1 of 2 under torchrun.*without torchrun"):
        evaluate(compose_config("evaluate", ["logger=none", f"workdir={tmp_path / 'work'}"]))
    assert not (tmp_path / "work").exists()
