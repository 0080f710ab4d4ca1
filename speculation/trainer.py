"""The one resumable training loop of this project: the embedded source LM and every learned predictor use it.

Per step ``s`` (0-based): torch's generator is seeded from ``(seed, s)`` (dropout, noisy gating), the learning rate
is set by :func:`lr_at`, the trainer's ``step_fn`` draws its batch (a pure function of ``(seed, s)`` too) and
returns the loss, and the loop does backward, gradient clipping and the optimizer step. Every ``eval_every`` steps
(and at the last) ``on_eval`` adds validation numbers to the step's record and may stop the run early. Every
``checkpoint_every`` steps model, optimizer and loop state go to ``state_path`` atomically, so a killed run resumes
and takes exactly the steps an uninterrupted one would.

Under torchrun (``ranks``, data-parallel predictor training) every rank runs this loop in step with the others:
``step_fn`` returns the global batch's loss on every rank and the loop averages the gradients over ranks after
the backward (:func:`speculation.distributed.average_gradients`), so clipping and the optimizer see the same
gradients everywhere; rank 0's parameters are broadcast once at the start. Every rank reads the checkpoint it
resumes from; rank 0 alone writes them (and shows progress). Each rank seeds torch from ``(seed, step, rank)``
(rank 0 as a single process does), so the ranks' dropout draws differ from one another instead of repeating
rank 0's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from speculation.distributed import SINGLE_PROCESS, Ranks, average_gradients, broadcast_parameters
from speculation.errors import UserError
from speculation.io import atomic_path
from speculation.tracking import Tracker


class Schedule(Protocol):
    """The fields of ``conf/source_train/`` and ``conf/train/`` the loop reads."""

    steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    grad_clip: float
    eval_every: int
    checkpoint_every: int


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """torch's seed at ``step`` on ``rank``: the same random draws whether or not the run was resumed. Rank 0 (a
    single process) keeps the seeds runs always had; another rank's seed is drawn from ``(seed, step, rank)``."""
    if rank == 0:
        return seed * 1_000_003 + step
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class LoopState:
    """What a resumed run continues from (besides model and optimizer)."""

    step: int = 0  # steps done
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step
    elapsed_s: float = 0.0  # training time before this process
    extra: dict[str, Any] = field(default_factory=dict)  # the trainer's own state (best checkpoint, patience)


StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]  # step -> (loss to minimise, numbers to log)
EvalFn = Callable[[int, dict[str, float], LoopState], bool]  # (steps done, record to extend, state) -> stop early


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Schedule,
    seed: int,
    state_path: Path,
    step_fn: StepFn,
    on_eval: EvalFn,
    tracker: Tracker,
    desc: str,
    device: torch.device | str = "cpu",
    config_group: str = "train",
    ranks: Ranks = SINGLE_PROCESS,
) -> tuple[LoopState, float]:
    """Train (resuming from ``state_path`` if it exists) until ``cfg.steps`` or an early stop.

    Returns the final state and the training time in seconds (this process and every earlier one). A loss that
    is not finite stops the run with a UserError naming the step and ``<config_group>.lr``. The caller checks
    that ``state_path`` belongs to this config before calling (on rank 0, before every rank reaches this).
    """
    state = LoopState()
    if state_path.exists():
        try:
            saved = torch.load(state_path, map_location=device, weights_only=False)
        except (RuntimeError, OSError, EOFError) as err:
            raise UserError(f"{state_path} is unreadable ({err}); delete it to train from step 0.") from None
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = LoopState(**saved)
    broadcast_parameters(model)  # every rank starts from rank 0's weights, fresh or resumed (a plain run: no-op)
    started = time.perf_counter() - state.elapsed_s
    model.train()
    progress = tqdm(range(state.step, cfg.steps), desc=desc, initial=state.step, total=cfg.steps,
                    disable=not ranks.is_main)  # fmt: skip
    for step in progress:
        torch.manual_seed(step_seed(seed, step, ranks.rank))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, metrics = step_fn(step)
        if not torch.isfinite(loss):
            raise UserError(
                f"{desc}: the loss is {loss.item()} at step {step + 1} (lr {lr_at(step, cfg):.3g}); train with a lower "
                f"{config_group}.lr or a longer {config_group}.warmup_steps."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.parameters())  # of the global loss: see speculation.distributed.total
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        record = {
            "step": step + 1,
            "lr": optimizer.param_groups[0]["lr"],
            **metrics,
            "train/grad_norm": grad_norm.item(),
        }
        stop = False
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            stop = on_eval(step + 1, record, state)
        state.history.append(record)
        tracker.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        state.step = step + 1
        if stop:
            break
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and ranks.is_main:
            state.elapsed_s = time.perf_counter() - started
            with atomic_path(state_path) as tmp:
                torch.save({**vars(state), "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    progress.close()
    return state, time.perf_counter() - started
