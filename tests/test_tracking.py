"""W&B runs that compare: read back from the offline files of a real evaluate run (no network)."""

from __future__ import annotations

import pytest
from conftest import TINY_SIM, compose_config, copy_workdir
from wandb_offline import read_offline_run

from speculation.stages.evaluate import evaluate
from speculation.tracking import run_id
from speculation.workdir import Workdir


@pytest.fixture
def offline_evaluation(trained, tmp_path, monkeypatch):
    """The trained workdir evaluated twice with W&B offline; the run directories under its wandb/."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables W&B; this test reads its offline files
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = copy_workdir(trained, tmp_path / "work")
    overrides = ["logger=wandb", "logger.mode=offline", f"workdir={workdir}", *TINY_SIM]
    for _ in range(2):
        evaluate(compose_config("evaluate", overrides))
    return workdir, sorted((Workdir(workdir).root / "wandb").glob("offline-run-*"))


def test_an_evaluate_run_carries_the_config_the_traces_and_the_headline(offline_evaluation):
    _, runs = offline_evaluation
    run = read_offline_run(runs[-1])
    config = run.config
    assert config["sim"]["headline_fraction"] == 0.5 and "prefetch_budget" in config["eval"]
    assert config["traces"]["model"] == "switch-lm-smoke" and config["traces"]["router"] == "linear-top1"
    assert config["traces"]["corpus"]["kind"] == "stdlib" and config["environment"]["torch"]
    assert {"switch-lm-smoke", "router-linear-top1", "transformer-seed0"} <= set(run.tags)
    summary = run.summary
    for metric in ("top1_acc", "recall_at_budget", "ece", "miss_top1_acc"):
        assert 0 <= summary[f"transformer-seed0/d1/{metric}"] <= 1
    assert summary["transformer-seed0/d1/kl"] >= 0
    assert summary["sim/best_ms_per_token"] <= summary["sim/on_demand_lru_ms_per_token"] + 1e-9
    assert summary["sim/oracle_lru_ms_per_token"] <= summary["sim/on_demand_lru_ms_per_token"]
    assert isinstance(summary["sim/best_policy"], str) and "sim/best_oracle_gain_fraction" in summary
    on_demand, best = summary["sim/on_demand_lru_ms_per_token"], summary["sim/best_ms_per_token"]
    oracle = summary["sim/best_eviction_oracle_ms_per_token"]  # the gain is against the oracle of the same eviction
    if on_demand - oracle > 1e-9:
        expected = (on_demand - best) / (on_demand - oracle)
        assert summary["sim/best_oracle_gain_fraction"] == pytest.approx(expected, rel=1e-6)


def test_a_rerun_continues_the_same_wandb_run(offline_evaluation):
    workdir, runs = offline_evaluation
    assert len(runs) == 2  # two offline segments of one run: `wandb sync` uploads them into the same id
    expected = run_id(workdir, "evaluate", "evaluate-switch-lm-smoke-test")
    assert {read_offline_run(run).run_id for run in runs} == {expected}
    assert run_id(workdir, "evaluate", "evaluate-switch-lm-smoke-val") != expected
