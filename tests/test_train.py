"""``spec-train``: a run's files, resume after a kill, a two-run sweep, and evaluation of the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_COLLECT, compose_config
from safetensors.torch import load_file

from collect.main import collect
from evaluate.main import evaluate
from speculation.evaluation.runner import traces_fingerprint
from speculation.predictors import training
from speculation.traces import TraceStore
from train.main import train

TINY_TRAIN = [
    "logger=none", "predictor.d_model=16", "predictor.max_lookahead=2", "train.steps=8", "train.batch_size=4",
    "train.warmup_steps=2", "train.eval_every=4", "train.val_windows=4", "train.checkpoint_every=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    overrides = [*TINY_COLLECT, f"workdir={root}", "trace.max_tokens_per_split=1500"]
    collect(compose_config("collect", overrides))
    return root


def config(workdir: Path, *extra: str):
    return compose_config("train", [f"workdir={workdir}", *TINY_TRAIN, *extra])


@pytest.mark.parametrize("kind", ["contextual", "transformer", "hierarchical"])
def test_a_run_writes_weights_curves_and_its_traces_fingerprint(workdir, kind):
    metrics = train(config(workdir, f"predictor={kind}", f"run_name={kind}-files"))
    run = workdir / "predictors" / f"{kind}-files"
    meta = json.loads((run / "predictor.json").read_text())
    assert meta["traces_fingerprint"] == traces_fingerprint(TraceStore.open(workdir / "traces"))
    assert meta["kind"] == kind and (run / "model.safetensors").stat().st_size > 0
    curves = pd.read_csv(run / "curves.csv")
    for term in ("routing", "confidence", "consistency", "diversity"):  # every term is logged at every step
        assert curves[f"train/{term}"].notna().all()
    assert "val/top1_d1" in metrics["best"] and not (run / "training_state.pt").exists()


def test_resume_after_a_kill_matches_an_uninterrupted_run(workdir, monkeypatch):
    train(config(workdir, "run_name=whole"))
    real_batch = training.WindowSource.batch
    calls = {"n": 0}

    def killed_at_the_seventh_batch(self, indices):
        calls["n"] += 1
        if calls["n"] == 7 + 1:  # + the validation batch at step 4
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, indices)

    monkeypatch.setattr(training.WindowSource, "batch", killed_at_the_seventh_batch)
    with pytest.raises(KeyboardInterrupt):
        train(config(workdir, "run_name=killed"))
    run = workdir / "predictors" / "killed"
    assert (run / "training_state.pt").exists() and not (run / "predictor.json").exists()
    monkeypatch.setattr(training.WindowSource, "batch", real_batch)
    train(config(workdir, "run_name=killed"))
    whole, resumed = (load_file(workdir / "predictors" / name / "model.safetensors") for name in ("whole", "killed"))
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
    curves = [pd.read_csv(workdir / "predictors" / name / "curves.csv") for name in ("whole", "killed")]
    pd.testing.assert_frame_equal(curves[0], curves[1])


def test_a_sweep_of_two_runs_yields_two_predictor_dirs(workdir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "train.main", "-m", f"workdir={workdir}", *TINY_TRAIN, "seed=0,1",
               "run_name=sweep-${seed}", f"hydra.sweep.dir={tmp_path}/multirun"]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).parents[1], capture_output=True)
    for seed in (0, 1):
        assert (workdir / "predictors" / f"sweep-{seed}" / "predictor.json").exists()
    a, b = (load_file(workdir / "predictors" / f"sweep-{s}" / "model.safetensors") for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different seeds, different models


def test_spec_evaluate_scores_trained_predictors_next_to_the_baselines(workdir):
    train(config(workdir, "run_name=scored"))
    evaluate(compose_config("evaluate", [f"workdir={workdir}", "logger=none", "eval.bootstrap=20"]))
    frame = pd.read_csv(workdir / "eval" / "metrics.csv")
    scored = frame[(frame["method"] == "scored") & (frame["layer"] == "all")]
    assert sorted(scored["lookahead"]) == [1, 2] and scored["top1_acc"].between(0, 1).all()


def test_traces_without_hidden_states_are_refused(tmp_path, workdir):
    target = tmp_path / "nohidden"
    overrides = [*TINY_COLLECT, f"workdir={target}", "trace.max_tokens_per_split=600", "trace.save_hidden=false"]
    collect(compose_config("collect", overrides))
    with pytest.raises(ValueError, match=r"need all .*trace.save_hidden=true"):
        train(config(target))
