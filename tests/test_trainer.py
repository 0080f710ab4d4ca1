"""The one training loop (``speculation.trainer``): the schedule's golden values, a killed run resuming to the same
weights and records, early stopping, and the same random draws at every step whether resumed or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speculation.config.collect import SourceTrainConfig
from speculation.config.predictor import PredictorTrainConfig
from speculation.tracking import Tracker
from speculation.trainer import LoopState, lr_at, step_seed, train_loop


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = SourceTrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_at(100, cfg) == pytest.approx(0.1)
    predictor = PredictorTrainConfig(steps=20, warmup_steps=0, lr=2.0, min_lr_ratio=0.5)  # both schemas fit it
    assert lr_at(0, predictor) == pytest.approx(2.0) and lr_at(20, predictor) == pytest.approx(1.0)


class Trainer:
    """A tiny regression with dropout, so both the batches and the torch draws matter."""

    def __init__(self, cfg, kill_at: int | None = None, stop_after_evals: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.cfg, self.kill_at, self.stop_after_evals = cfg, kill_at, stop_after_evals

    def step_fn(self, step: int):
        if step == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        rng = np.random.default_rng([0, step])
        x = torch.from_numpy(rng.normal(size=(16, 4)).astype(np.float32))
        loss = (self.model(x).squeeze(-1) - x.sum(-1)).square().mean()
        return loss, {"train/loss": loss.item()}

    def on_eval(self, step: int, record: dict, state: LoopState) -> bool:
        record["val/step"] = float(step)
        state.extra["evals"] = state.extra.get("evals", 0) + 1
        return self.stop_after_evals is not None and state.extra["evals"] >= self.stop_after_evals

    def run(self, path):
        return train_loop(self.model, self.optimizer, self.cfg, 0, path, self.step_fn, self.on_eval, Tracker(), "t")


CFG = PredictorTrainConfig(steps=10, lr=0.01, warmup_steps=2, eval_every=4, checkpoint_every=3)


def test_a_killed_run_resumes_to_the_weights_and_records_of_an_uninterrupted_one(tmp_path):
    whole = Trainer(CFG)
    state, _ = whole.run(tmp_path / "whole.pt")
    killed = Trainer(CFG, kill_at=7)
    with pytest.raises(KeyboardInterrupt):
        killed.run(tmp_path / "killed.pt")
    assert (tmp_path / "killed.pt").exists()  # the checkpoint at step 6
    resumed = Trainer(CFG)  # a fresh process: new model and optimizer, state from the file
    resumed_state, _ = resumed.run(tmp_path / "killed.pt")
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_state.history == state.history and resumed_state.step == 10
    assert [r["step"] for r in state.history if "val/step" in r] == [4, 8, 10]  # every eval_every, and the last
    assert resumed_state.extra == {"evals": 3}


def test_early_stopping_ends_the_run_at_the_evaluation_that_asks(tmp_path):
    state, _ = Trainer(CFG, stop_after_evals=2).run(tmp_path / "state.pt")
    assert state.step == 8 and len(state.history) == 8


def test_each_step_draws_from_its_own_seed():
    assert step_seed(0, 5) == 5 and step_seed(3, 5) == 3 * 1_000_003 + 5
    torch.manual_seed(step_seed(2, 7))
    first = torch.rand(3)
    torch.manual_seed(step_seed(2, 7))
    assert torch.equal(first, torch.rand(3))


def test_a_loss_that_is_not_finite_stops_the_run_with_the_step_and_the_key_to_lower(tmp_path):
    trainer = Trainer(CFG)
    real = trainer.step_fn
    trainer.step_fn = lambda step: (real(step)[0] * (float("nan") if step == 5 else 1.0), {})
    with pytest.raises(
        ValueError, match=r"^t: the loss is nan at step 6 \(lr 0.00[0-9]+\); train with a lower train.lr"
    ):
        trainer.run(tmp_path / "state.pt")
