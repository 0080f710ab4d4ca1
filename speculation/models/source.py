"""Train (or reload) the embedded Switch LM that the traces come from.

``Workdir.source_model`` holds ``config.json`` (everything that defines the model), ``model.safetensors`` when
training finished, ``training_state.pt`` while it is in progress (so a killed run resumes), and ``metrics.json``
(validation loss next to a unigram baseline on the same tokens). Training runs the shared loop of
:mod:`speculation.trainer`: each step's batch and random state derive from ``(seed, step)``, so a resumed run takes
exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from speculation.config.collect import SourceTrainConfig
from speculation.config.model import ModelConfig, RouterConfig
from speculation.environment import environment
from speculation.errors import MissingInputError, UserError
from speculation.identity import claim_identity
from speculation.io import atomic_path, atomic_write_json, remove_stale_temps
from speculation.models.switch_lm import SwitchLM
from speculation.tokenizer import EOS_ID, unigram_cross_entropy
from speculation.tracking import Tracker
from speculation.trainer import LoopState, train_loop
from speculation.workdir import CONFIG_FILE, METRICS_FILE, STATE_FILE, WEIGHTS_FILE

# Not part of an embedded model's identity: HF-only keys, and where a model trained elsewhere comes from.
HF_ONLY_FIELDS = (
    "path",
    "dtype",
    "revision",
    "device_map",
    "max_memory",
    "offload_folder",
    "encoder_fraction",
    "source_workdir",
)


def pack_documents(documents: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate token ids with an EOS after each document: the stream LM windows are cut from."""
    pieces = []
    for ids in documents:
        pieces.extend([np.asarray(ids, dtype=np.int64), np.array([EOS_ID], dtype=np.int64)])
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def sample_batch(stream: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens, a pure function of ``(seed, step)``."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]))


def eval_windows(stream: np.ndarray, num_windows: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced, fixed validation windows (the same ones at every evaluation)."""
    span = seq_len + 1
    if len(stream) < span:
        raise UserError(
            f"the validation split has {len(stream)} tokens, fewer than one window of {span}. "
            "Raise corpus.val_fraction or corpus.max_documents, or lower source_train.seq_len."
        )
    starts = np.linspace(0, len(stream) - span, num=min(num_windows, len(stream) // span)).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + span] for s in starts]))


@torch.no_grad()
def evaluate_lm(model: SwitchLM, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) over every target token of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        out = model(batch[:, :-1], targets_BT=batch[:, 1:])
        total += float(out.lm_loss) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def source_identity(model: ModelConfig, router: RouterConfig, train: SourceTrainConfig, data_fingerprint: str) -> dict:
    """Everything that determines the trained weights; a checkpoint is reused only when this matches.

    Keys that only matter for HF checkpoints are left out, so they cannot invalidate an embedded model.
    """
    embedded = {k: v for k, v in asdict(model).items() if k not in HF_ONLY_FIELDS}
    schedule = {k: v for k, v in asdict(train).items() if k != "require_beats_unigram"}
    return json.loads(
        json.dumps(
            {"model": embedded, "router": asdict(router), "source_train": schedule, "data": data_fingerprint},
            default=str,
        )
    )


def check_beats_unigram(metrics: dict[str, Any], out_dir: Path, cfg: SourceTrainConfig) -> None:
    """Refuse a source model whose validation loss is not below the unigram baseline's (it routes noise)."""
    if cfg.require_beats_unigram and not metrics["val_loss"] < metrics["unigram_val_loss"]:
        raise UserError(
            f"the source model in {out_dir} does not beat the unigram baseline on validation text "
            f"({metrics['val_loss']:.3f} vs {metrics['unigram_val_loss']:.3f} nats/token), so its routing means "
            "little; delete that directory and train longer (source_train.steps) or on real text (is corpus.glob "
            "matching text files?), or pass source_train.require_beats_unigram=false to trace it anyway."
        )


def load_source_model(out_dir: Path, device: torch.device | str = "cpu") -> SwitchLM:
    """Rebuild a trained embedded model from ``config.json`` + ``model.safetensors``."""
    out_dir = Path(out_dir)
    if not (out_dir / WEIGHTS_FILE).exists():
        raise MissingInputError(f"no {WEIGHTS_FILE} in {out_dir}; run `spec-collect workdir=...` to train one.")
    saved = json.loads((out_dir / CONFIG_FILE).read_text())
    model = SwitchLM(ModelConfig(**saved["model"]), RouterConfig.from_json(saved["router"]))
    model.load_state_dict(load_file(out_dir / WEIGHTS_FILE, device="cpu"))
    return model.to(device).eval()


def train_or_load(
    out_dir: Path,
    identity: dict,
    model_cfg: ModelConfig,
    router_cfg: RouterConfig,
    train_cfg: SourceTrainConfig,
    train_ids: Sequence[np.ndarray],
    val_ids: Sequence[np.ndarray],
    device: torch.device,
    tracker: Tracker,
) -> tuple[SwitchLM, dict[str, Any]]:
    """Return the trained model and its metrics, training (or resuming) only when needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_identity(
        out_dir / CONFIG_FILE,
        identity,
        holds="a source model trained with a different config",
        fix="Use another workdir for this config, or delete that source_model directory to retrain.",
    )
    if (out_dir / WEIGHTS_FILE).exists():
        return load_source_model(out_dir, device), json.loads((out_dir / METRICS_FILE).read_text())
    remove_stale_temps(out_dir)

    train_stream, val_stream = pack_documents(train_ids), pack_documents(val_ids)
    if len(train_stream) <= train_cfg.seq_len + 1:
        raise UserError(
            f"the train split has {len(train_stream)} tokens, too few for source_train.seq_len={train_cfg.seq_len}. "
            "Use a larger corpus (corpus.max_documents=null) or a shorter seq_len."
        )
    windows = eval_windows(val_stream, train_cfg.eval_batches * train_cfg.batch_size, train_cfg.seq_len)
    unigram_loss = unigram_cross_entropy(train_ids, [windows[:, 1:].reshape(-1).numpy()], model_cfg.vocab_size)

    torch.manual_seed(train_cfg.seed)
    model = SwitchLM(model_cfg, router_cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
    )

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = sample_batch(train_stream, train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed, step).to(device)
        out = model(batch[:, :-1], targets_BT=batch[:, 1:])
        return out.loss, {
            "train/lm_loss": out.lm_loss.item(),
            "train/aux_loss": out.aux_loss.item(),
            "train/load_balance_loss": torch.stack([r.load_balance_loss for r in out.routes]).mean().item(),
            "train/z_loss": torch.stack([r.z_loss for r in out.routes]).mean().item(),
        }

    def on_eval(_: int, record: dict[str, float], __: LoopState) -> bool:
        record["val/lm_loss"] = evaluate_lm(model, windows, train_cfg.batch_size, device)
        return False  # no early stopping: the source model trains for its full schedule

    state, train_time = train_loop(
        model, optimizer, train_cfg, train_cfg.seed, out_dir / STATE_FILE, step_fn, on_eval, tracker,
        desc="train source model", device=device, config_group="source_train",
    )  # fmt: skip
    history = state.history
    val_loss = history[-1]["val/lm_loss"] if history else evaluate_lm(model, windows, train_cfg.batch_size, device)
    metrics = {
        "val_loss": val_loss,
        "unigram_val_loss": unigram_loss,
        "val_tokens": int(windows[:, 1:].numel()),
        "train_time_s": train_time,
        "steps": train_cfg.steps,
        "train_tokens": train_cfg.steps * train_cfg.batch_size * train_cfg.seq_len,
        "parameters": model.num_parameters(),
        "active_parameters": model.num_parameters(active_only=True),
        "device": str(device),
        "environment": environment(),  # the commit, versions and machine that trained it
        "history": history,
    }
    atomic_write_json(out_dir / METRICS_FILE, metrics, sort_keys=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:  # the weights file marks completion: written last
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    tracker.summary(
        {"source/val_loss": val_loss, "source/unigram_val_loss": unigram_loss, "source/train_time_s": train_time}
    )
    return model.eval(), metrics
