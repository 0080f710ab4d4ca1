"""Data-parallel predictor training under ``torchrun`` (issue #15 item 3): the sampler's shares of a global batch,
the loss sums over ranks (a spawned 2-process gloo group), and 2-rank runs against 1-rank ones: the same curves,
validation loss and best step, a finished run reused whatever the rank count, and a run whose rank 1 is killed
resuming (with 2 ranks or with 1) to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_TRAIN, compose_config, copy_workdir
from safetensors.torch import load_file

from speculation import distributed, losses
from speculation.distributed import Ranks, share
from speculation.errors import UserError
from speculation.stages.train import train
from speculation.workdir import (
    CURVES_FILE,
    IDENTITY_FILE,
    METRICS_FILE,
    PREDICTOR_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Workdir,
)

REPO = Path(__file__).parents[1]
# torchrun's children must import this checkout, whatever the venv's editable install points at.
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
# 12 steps of 5 windows (rank 0 takes 3, rank 1 takes 2), validated at 4, 8 and 12 on 12 windows (batches of 5, 5
# and 2: rank 0 runs two of them), checkpointed every 3; every loss term trains. Dropout 0: a rank draws dropout
# for its own rows only, so with dropout the runs are equal in distribution, not in value (docs/prediction.md).
DDP_TRAIN = [*TINY_TRAIN, "train.steps=12", "train.batch_size=5", "train.val_windows=12", "predictor.dropout=0",
             "loss.consistency=0.1"]  # fmt: skip
RTOL = 1e-5  # float32 sums split over ranks round differently; the curves agree to ~1e-7 relative


# ---- the sampler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 5, 8, 9])
def test_the_shares_of_a_global_batch_are_contiguous_and_cover_it_once(count):
    rows = np.arange(count)
    for world in range(1, count + 1):
        shares = [rows[share(count, Ranks(rank=r, world=world, local_world=world, local_rank=r))] for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(shares), rows)  # every row once, in order
        assert [len(s) for s in shares] == [len(s) for s in np.array_split(rows, world)]  # sizes differ by <= 1
        assert all(len(s) for s in shares)


def test_a_batch_smaller_than_the_ranks_is_refused_before_any_work(tmp_path, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "work"
    with pytest.raises(UserError, match=r"train.batch_size=3 is smaller than the 4 ranks .* at least 4 .* at most 3"):
        train(compose_config("train", [f"workdir={workdir}", *TINY_TRAIN, "train.batch_size=3"]))
    assert not workdir.exists()  # refused before the group, the locks or the run directory


# ---- the loss over ranks ---------------------------------------------------------------------------------------


class Heads(torch.nn.Module):
    """Logits, confidences and a head no loss uses (its parameters must keep no gradient on every rank)."""

    def __init__(self, features: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.logits = torch.nn.Linear(features, int(np.prod(shape)))
        self.confidence = torch.nn.Linear(features, int(np.prod(shape[:-1])))
        self.unused = torch.nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:2]
        return self.logits(x).view(*lead, *self.shape), torch.sigmoid(self.confidence(x)).view(*lead, *self.shape[:-1])


def batch_and_model():
    """A batch of 5 windows with padding, invalid entries, miss weights, and a model: the same on every process."""
    generator = torch.Generator().manual_seed(0)
    B, T, L, D, E, F = 5, 6, 3, 2, 4, 7
    batch = {
        "x": torch.randn(B, T, F, generator=generator),
        "valid": torch.rand(B, T, L, D, generator=generator) > 0.3,
        "top1": torch.randint(0, E, (B, T, L, D), generator=generator),
        "probs": torch.softmax(torch.randn(B, T, L, D, E, generator=generator), -1),
        "pair": torch.rand(B, T, generator=generator) > 0.2,
        "weight": 1.0 + (torch.rand(B, T, L, D, generator=generator) > 0.5).float(),
    }
    batch["valid"][1] = False  # a window without a valid entry: its rank's sums are zero, the global ones are not
    marginal = torch.softmax(torch.randn(L, D, E, generator=generator), -1)
    torch.manual_seed(0)
    return batch, marginal, Heads(F, (L, D, E))


def loss_of(model, batch, marginal, rows: slice, total) -> dict[str, torch.Tensor]:
    logits, confidence = model(batch["x"][rows])
    valid, top1 = batch["valid"][rows], batch["top1"][rows]
    terms = {
        "routing": losses.routing_loss(logits, top1, batch["probs"][rows], valid, "kl", batch["weight"][rows], total),
        "confidence": losses.confidence_loss(logits, confidence, top1, valid, total),
        "consistency": losses.consistency_loss(logits, batch["pair"][rows], valid, total),
        "diversity": losses.diversity_loss(logits, valid, marginal, total),
    }
    return {**terms, "total": losses.combine(terms, dict.fromkeys(losses.LOSS_TERMS, 1.0))}


def _loss_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    batch, marginal, model = batch_and_model()
    with distributed.process_group(torch.device("cpu")) as ranks:
        rows = share(5, ranks)
        terms = loss_of(model, batch, marginal, rows, distributed.total)
        naive = loss_of(model, batch, marginal, rows, losses.local)  # each rank's rows alone: what must not happen
        terms["total"].backward()
        distributed.average_gradients(model.parameters())
        result = {
            "terms": {name: value.item() for name, value in terms.items()},
            "naive": {name: value.item() for name, value in naive.items()},
            "grads": {name: None if p.grad is None else p.grad.tolist() for name, p in model.named_parameters()},
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_get_the_global_batch_s_loss_and_gradient(tmp_path):
    """Every term summed over 2 ranks (rows 3 + 2) equals the term on the whole batch on each rank, and the
    gradient averaged over the ranks equals the whole batch's; the per-rank terms alone differ, so a missing sum
    would fail this."""
    mp.spawn(_loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    batch, marginal, model = batch_and_model()
    whole = loss_of(model, batch, marginal, slice(None), losses.local)
    whole["total"].backward()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, value in whole.items():
            assert result["terms"][name] == pytest.approx(value.item(), rel=1e-6), (rank, name)
        for name in ("routing", "diversity"):  # a mean over rows of 1 rank, a batch statistic of 1 rank
            assert result["naive"][name] != pytest.approx(whole[name].item(), rel=1e-3), (rank, name)
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                assert result["grads"][name] is None, name  # the unused head: no gradient, as in one process
            else:
                np.testing.assert_allclose(result["grads"][name], parameter.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert model.unused.weight.grad is None


# ---- 2 ranks against 1 -----------------------------------------------------------------------------------------


def torchrun(workdir: Path, *overrides: str, ranks: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """``spec-train`` (or the kill hook of tests/ddp_worker.py) under ``torchrun --standalone``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(REPO / "tests" / "ddp_worker.py"), f"workdir={workdir}", *DDP_TRAIN, *overrides]  # fmt: skip
    return subprocess.run(command, env={**ENV, **(env or {})}, cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def ddp_workdir(collected: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``collected`` with the 1-rank run ``one`` (in-process) and the 2-rank run ``two`` of the same config."""
    workdir = copy_workdir(collected, tmp_path_factory.mktemp("ddp") / "work")
    train(compose_config("train", [f"workdir={workdir}", *DDP_TRAIN, "run_name=one"]))
    done = torchrun(workdir, "run_name=two")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def assert_same_run(workdir: Path, name: str, reference: str = "one") -> None:
    run, ref = Workdir(workdir).run(name), Workdir(workdir).run(reference)
    curves, expected = pd.read_csv(run / CURVES_FILE), pd.read_csv(ref / CURVES_FILE)
    assert list(curves.columns) == list(expected.columns) and len(curves) == len(expected) == 12
    for column in expected.columns:  # train losses at every step, validation at 4, 8, 12, lr, grad norms
        np.testing.assert_allclose(curves[column], expected[column], rtol=RTOL, atol=1e-9, err_msg=column)
    best, best_expected = (json.loads((r / METRICS_FILE).read_text())["best"] for r in (run, ref))
    assert best["step"] == best_expected["step"]
    assert best["val/routing"] == pytest.approx(best_expected["val/routing"], rel=RTOL)
    weights, weights_expected = load_file(run / WEIGHTS_FILE), load_file(ref / WEIGHTS_FILE)
    for key, tensor in weights_expected.items():  # Adam amplifies rounding where gradients are ~0: atol, not rtol
        torch.testing.assert_close(weights[key], tensor, rtol=1e-3, atol=1e-4, msg=key)
    assert (run / IDENTITY_FILE).read_text() == (ref / IDENTITY_FILE).read_text()  # the rank count is no identity
    assert not (run / STATE_FILE).exists() and not list(run.glob("*.tmp"))


@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains(ddp_workdir):
    assert_same_run(ddp_workdir, "two")
    metrics = json.loads((Workdir(ddp_workdir).run("two") / METRICS_FILE).read_text())
    assert metrics["ranks"] == {"world_size": 2, "threads_per_rank": metrics["environment"]["threads"]}
    one = json.loads((Workdir(ddp_workdir).run("one") / METRICS_FILE).read_text())
    assert one["ranks"]["world_size"] == 1


@pytest.mark.slow
def test_a_finished_run_is_reused_whatever_the_rank_count(ddp_workdir):
    """A 1-rank rerun of the 2-rank run reuses it, and a 2-rank rerun of the 1-rank run reuses that."""
    runs = {name: Workdir(ddp_workdir).run(name) for name in ("one", "two")}
    before = {name: (run / PREDICTOR_FILE).stat().st_mtime_ns for name, run in runs.items()}
    metrics = train(compose_config("train", [f"workdir={ddp_workdir}", *DDP_TRAIN, "run_name=two"]))
    assert metrics == json.loads((runs["two"] / METRICS_FILE).read_text())
    done = torchrun(ddp_workdir, "run_name=one")
    assert done.returncode == 0, done.stderr[-3000:]
    assert {name: (run / PREDICTOR_FILE).stat().st_mtime_ns for name, run in runs.items()} == before


@pytest.mark.slow
def test_a_run_whose_rank_dies_resumes_to_the_uninterrupted_result(ddp_workdir):
    """Rank 1 is SIGKILLed after rank 0's first checkpoint; the same command resumes it (and so does a 1-rank run
    of a copy), and both end where the uninterrupted run did."""
    run = Workdir(ddp_workdir).run("killed")
    killed = torchrun(ddp_workdir, "run_name=killed", env={"KILL_RANK": "1", "KILL_AFTER": str(run / STATE_FILE)})
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert (run / STATE_FILE).exists() and not (run / PREDICTOR_FILE).exists()
    assert torch.load(run / STATE_FILE, weights_only=False)["step"] < 12
    shutil.copytree(run, Workdir(ddp_workdir).run("killed-then-one-rank"))

    resumed = torchrun(ddp_workdir, "run_name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ddp_workdir, "killed")
    train(compose_config("train", [f"workdir={ddp_workdir}", *DDP_TRAIN, "run_name=killed-then-one-rank"]))
    assert_same_run(ddp_workdir, "killed-then-one-rank")
