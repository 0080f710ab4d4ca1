"""Predictor training (``speculation.predictors.training``) through the train stage: a run's files, resume after
a kill, and a run that cannot train on traces without hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_COLLECT, TINY_TRAIN, compose_config
from safetensors.torch import load_file

from speculation.predictors import training
from speculation.stages.collect import collect
from speculation.stages.train import train
from speculation.traces import TraceStore
from speculation.workdir import CURVES_FILE, PREDICTOR_FILE, STATE_FILE, WEIGHTS_FILE, Workdir


def config(workdir: Path, *extra: str):
    return compose_config("train", [f"workdir={workdir}", *TINY_TRAIN, *extra])


@pytest.mark.parametrize("kind", ["contextual", "transformer", "hierarchical"])
def test_a_run_writes_weights_curves_and_its_traces_fingerprint(workdir, kind):
    metrics = train(config(workdir, f"predictor={kind}", f"run_name={kind}-files"))
    run = Workdir(workdir).run(f"{kind}-files")
    meta = json.loads((run / PREDICTOR_FILE).read_text())
    assert meta["traces_fingerprint"] == TraceStore.open(Workdir(workdir).traces()).manifest.fingerprint()
    assert meta["kind"] == kind and (run / WEIGHTS_FILE).stat().st_size > 0
    curves = pd.read_csv(run / CURVES_FILE)
    for term in ("routing", "confidence", "consistency", "diversity"):  # every term is logged at every step
        assert curves[f"train/{term}"].notna().all()
    assert curves["val/top1_d1"].notna().sum() == 2  # evaluated at steps 4 and 8
    assert "val/top1_d1" in metrics["best"] and not (run / STATE_FILE).exists()
    assert not list(run.glob("*.tmp"))


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
    run = Workdir(workdir).run("killed")
    assert (run / STATE_FILE).exists() and not (run / PREDICTOR_FILE).exists()
    monkeypatch.setattr(training.WindowSource, "batch", real_batch)
    train(config(workdir, "run_name=killed"))
    whole, resumed = (load_file(Workdir(workdir).run(name) / WEIGHTS_FILE) for name in ("whole", "killed"))
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
    curves = [pd.read_csv(Workdir(workdir).run(name) / CURVES_FILE) for name in ("whole", "killed")]
    pd.testing.assert_frame_equal(curves[0], curves[1])


def test_traces_without_hidden_states_are_refused(tmp_path):
    target = tmp_path / "nohidden"
    overrides = [*TINY_COLLECT, f"workdir={target}", "trace.max_tokens_per_split=600", "trace.save_hidden=false"]
    collect(compose_config("collect", overrides))
    with pytest.raises(ValueError, match=r"need all .*trace.save_hidden=true"):
        train(config(target))


def test_the_miss_weighted_loss_trains_another_model(workdir):
    train(config(workdir, "run_name=plain"))
    train(config(workdir, "run_name=misses", "loss.miss_weight=2"))
    plain, misses = (load_file(Workdir(workdir).run(name) / WEIGHTS_FILE) for name in ("plain", "misses"))
    assert any(not torch.equal(plain[name], misses[name]) for name in plain)  # the same seed, a different loss
    identity = json.loads((Workdir(workdir).run("misses") / "identity.json").read_text())
    assert identity["loss.miss_weight"] == 2.0 and identity["loss.miss_window"] == 4
