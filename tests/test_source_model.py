"""Source-model training: schedule, resume after a kill, reuse, and refusal of a mismatched checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from speculation.config import ModelConfig, RouterConfig, SourceTrainConfig
from speculation.models import source
from speculation.models.source import pack_documents, sample_batch, source_identity, train_or_load
from speculation.tokenizer import EOS_ID
from speculation.tracking import Tracker

MODEL = ModelConfig(vocab_size=48, d_model=16, num_layers=4, num_heads=2, d_ff=32, num_experts=4, max_seq_len=32)
TRAIN = SourceTrainConfig(
    lr=1e-2, steps=12, batch_size=4, seq_len=16, warmup_steps=3, eval_every=6, eval_batches=2, checkpoint_every=4
)


def documents(seed: int, count: int = 12) -> list[np.ndarray]:
    """Learnable text: each document counts up in steps of 3 (mod 46) from a random start."""
    rng = np.random.default_rng(seed)
    return [
        (2 + (int(rng.integers(0, 46)) + 3 * np.arange(int(rng.integers(20, 60)))) % 46).astype(np.int32)
        for _ in range(count)
    ]


def run(out_dir, train_cfg=TRAIN, router=None):
    router = router or RouterConfig()
    identity = source_identity(MODEL, router, train_cfg, "data-v1")
    return train_or_load(
        out_dir, identity, MODEL, router, train_cfg, documents(0), documents(1), torch.device("cpu"), Tracker()
    )


def test_batches_are_a_pure_function_of_seed_and_step():
    stream = pack_documents(documents(0))
    assert (stream == EOS_ID).sum() == 12
    assert torch.equal(sample_batch(stream, 4, 8, seed=0, step=5), sample_batch(stream, 4, 8, seed=0, step=5))
    assert not torch.equal(sample_batch(stream, 4, 8, seed=0, step=5), sample_batch(stream, 4, 8, seed=0, step=6))


def test_training_beats_unigram_and_writes_checkpoint(tmp_path):
    _, metrics = run(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "training_state.pt").exists()
    assert metrics["unigram_val_loss"] == pytest.approx(np.log(46), abs=0.05)  # every token equally frequent
    assert metrics["val_loss"] < metrics["unigram_val_loss"] - 0.5  # it has learned the counting rule
    assert set(json.loads((tmp_path / "config.json").read_text())) == {"model", "router", "source_train", "data"}


def test_resume_after_kill_gives_identical_weights(tmp_path, monkeypatch):
    run(tmp_path / "uninterrupted")
    real_sample = source.sample_batch

    def killed_at_step_9(stream, batch_size, seq_len, seed, step):
        if step == 9:
            raise KeyboardInterrupt("simulated kill")
        return real_sample(stream, batch_size, seq_len, seed, step)

    monkeypatch.setattr(source, "sample_batch", killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "training_state.pt").exists()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # nothing that looks finished
    monkeypatch.setattr(source, "sample_batch", real_sample)
    _, metrics = run(tmp_path / "resumed")
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert len(metrics["history"]) == TRAIN.steps


def test_matching_checkpoint_is_reused_and_another_config_is_refused(tmp_path):
    run(tmp_path)
    weights = tmp_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    run(tmp_path)
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"differs in: router.k.*another workdir"):
        run(tmp_path, router=RouterConfig(k=2))
