"""The training runs of a workdir (``speculation.predictors.runs``) on the shared trained workdir and a copy with
an ablation: labels, tables, the schedule check, and the loss total."""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY_TRAIN, compose_config

from speculation.predictors import runs as training_runs
from speculation.stages.train import train
from speculation.workdir import STATE_FILE, Workdir


@pytest.fixture(scope="module")
def ablated(trained, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablated") / "work"
    shutil.copytree(trained, workdir)
    train(compose_config("train", [f"workdir={workdir}", *TINY_TRAIN, "loss.confidence=0", "run_name=ctx-noconf"]))
    train(compose_config("train", [f"workdir={workdir}", *TINY_TRAIN, "seed=1", "run_name=contextual-seed1"]))
    (Workdir(workdir).run("half") / STATE_FILE).parent.mkdir(parents=True)
    (Workdir(workdir).run("half") / STATE_FILE).write_bytes(b"")
    return training_runs.finished_runs(Workdir(workdir).predictors)


def test_finished_runs_are_read_and_unfinished_ones_listed(ablated):
    assert sorted(ablated.table.index) == ["contextual-seed0", "contextual-seed1", "ctx-noconf", "hierarchical-seed0",
                                           "probe-seed0", "transformer-seed0"]  # fmt: skip
    assert ablated.skipped == {"half": "still training (training_state.pt, no predictor.json)"}
    assert ablated.lookaheads == [1, 2] and set(ablated.curves["run"]) == set(ablated.table.index)


def test_an_ablation_labels_itself_and_is_compared_with_its_kinds_reference(ablated):
    assert ablated.table.loc["ctx-noconf", "loss_changes"] == "confidence=0"
    assert ablated.table.loc["contextual-seed1", "loss_changes"] == training_runs.REFERENCE
    table = training_runs.ablations(ablated)
    reference = table.loc[("contextual", training_runs.REFERENCE)]
    assert reference["seeds"] == "0, 1" and reference["best.val/top1_d1 vs reference"] == 0.0
    noconf = table.loc[("contextual", "confidence=0")]
    assert noconf["best.val/top1_d1 vs reference"] == pytest.approx(
        ablated.table.loc["ctx-noconf", "best.val/top1_d1"] - reference["best.val/top1_d1 mean"]
    )
    first = training_runs.runs_table(ablated)
    assert list(first.index[:3]) == ["contextual-seed0", "contextual-seed1", "ctx-noconf"]  # reference runs first
    assert training_runs.varying_config(ablated) == {}


def test_the_logged_schedule_is_the_configured_one_and_the_total_is_the_weighted_sum(ablated):
    check = training_runs.schedule_check(ablated, "contextual-seed0")
    assert len(check) == 8 and (check["lr"] - check["configured_lr"]).abs().max() < 1e-12
    assert (training_runs.total_loss_error(ablated) < 1e-5).all()
