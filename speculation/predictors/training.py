"""Train a learned predictor on a trace store: masked multi-term loss, early stopping, resumable.

``workdir/predictors/<run>/`` ends up with ``model.safetensors`` (the best validation checkpoint),
``predictor.json`` (type, traces fingerprint, config: what ``spec-evaluate`` loads), ``metrics.json`` and
``curves.csv`` (every loss term at every step). ``training_state.pt`` exists while training runs, so a killed run
resumes; every step's windows, masks and dropout draws derive from ``(seed, step)``, so a resumed run takes
exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from speculation.config import TrainConfig
from speculation.evaluation.runner import traces_fingerprint
from speculation.losses import combine, confidence_loss, consistency_loss, diversity_loss, routing_loss
from speculation.models.source import lr_at  # one warm-up + cosine schedule for every trainer
from speculation.predictors.learned import PredictorInputs, build_model
from speculation.predictors.windows import Targets, top1_marginal, window_tensors
from speculation.traces import SequenceDataset, TraceStore
from speculation.tracking import Tracker

STATE_FILE = "training_state.pt"


def check_store(store: TraceStore) -> list[int]:
    """The learned predictors read every layer's hidden state; one clear error if the traces lack them."""
    layers = list(store.manifest.get("hidden", {}).get("layers", []))
    if layers != list(range(len(store.layer_names))):
        raise ValueError(
            f"{store.root} holds hidden states of MoE layers {layers}, but learned predictors need all "
            f"{len(store.layer_names)}; re-collect with trace.save_hidden=true trace.hidden_layers=null."
        )
    for split in ("train", "val"):
        if split not in store.splits or store.split(split).num_rows == 0:
            raise ValueError(f"{store.root} has no {split!r} split with tokens; spec-train needs train and val.")
    return layers


class WindowSource:
    """Whole traced sequences of a split as padded windows, batched by index."""

    def __init__(self, store: TraceStore, split: str, max_lookahead: int) -> None:
        self.dataset = SequenceDataset(store.split(split), fields=("experts", "logits", "hidden"))
        self.score = store.manifest["routing"].get("score", "softmax")
        self.max_lookahead = max_lookahead

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: np.ndarray) -> tuple[PredictorInputs, Targets]:
        items = [self.dataset[int(i)] for i in indices]
        stack = {
            key: torch.stack([item[key] for item in items]).numpy() for key in ("experts", "logits", "hidden", "mask")
        }
        return window_tensors(
            stack["experts"], stack["logits"], stack["hidden"], stack["mask"], self.score, self.max_lookahead
        )


def loss_terms(model, inputs: PredictorInputs, targets: Targets, marginal_LDE, routing_mode: str) -> tuple:
    outputs = model(inputs)
    logits, top1, valid = outputs.logits_BTLDE, targets.top1_BTLD, targets.valid_BTLD
    terms = {
        "routing": routing_loss(logits, top1, targets.probs_BTLDE, valid, routing_mode),
        "confidence": confidence_loss(logits, outputs.confidence_BTLD, top1, valid),
        "consistency": consistency_loss(logits, targets.pair_BT, valid),
        "diversity": diversity_loss(logits, valid, marginal_LDE),
    }
    return outputs, terms


@torch.no_grad()
def validate(model, source: WindowSource, indices: np.ndarray, marginal_LDE, cfg: TrainConfig, device) -> dict:
    """Mean loss terms and top-1 accuracy per lookahead on fixed validation windows (no masking)."""
    model.eval()
    sums: dict[str, float] = {}
    correct = np.zeros(cfg.predictor.max_lookahead)
    count = np.zeros(cfg.predictor.max_lookahead)
    for start in range(0, len(indices), cfg.train.batch_size):
        inputs, targets = source.batch(indices[start : start + cfg.train.batch_size])
        inputs, targets = _to(inputs, device), _to(targets, device)
        outputs, terms = loss_terms(model, inputs, targets, marginal_LDE, cfg.loss.routing_mode)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        hits = (outputs.logits_BTLDE.argmax(-1) == targets.top1_BTLD) & targets.valid_BTLD
        correct += hits.sum((0, 1, 2)).cpu().numpy()
        count += targets.valid_BTLD.sum((0, 1, 2)).cpu().numpy()
    batches = math.ceil(len(indices) / cfg.train.batch_size)
    model.train()
    metrics = {f"val/{name}": value / batches for name, value in sums.items()}
    for j in range(cfg.predictor.max_lookahead):
        if count[j]:
            metrics[f"val/top1_d{j + 1}"] = float(correct[j] / count[j])
    return metrics


def _to(item, device):
    for key, value in vars(item).items():
        if isinstance(value, torch.Tensor):
            setattr(item, key, value.to(device))
    return item


def train_predictor(cfg: TrainConfig, store: TraceStore, out_dir: Path, device: torch.device, tracker: Tracker) -> dict:
    """Train (or resume) one predictor into ``out_dir``; returns its metrics."""
    check_store(store)
    if (out_dir / "predictor.json").exists():
        return json.loads((out_dir / "metrics.json").read_text())  # finished earlier: nothing to do
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = (WindowSource(store, split, cfg.predictor.max_lookahead) for split in ("train", "val"))
    num_layers, num_experts = len(store.layer_names), store.num_experts
    hidden_size = int(store.manifest["hidden"]["size"])
    marginal = top1_marginal(store.split("train").array("experts"), num_experts, cfg.predictor.max_lookahead).to(device)
    val_indices = np.random.default_rng([cfg.seed, 10**6]).permutation(len(val))[: cfg.train.val_windows]

    torch.manual_seed(cfg.seed)
    model = build_model(num_layers, num_experts, hidden_size, cfg.predictor).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    weights = {name: getattr(cfg.loss, name) for name in ("routing", "confidence", "consistency", "diversity")}
    state = {"step": 0, "history": [], "best": None, "best_state": None, "bad_evals": 0, "elapsed_s": 0.0}
    if (out_dir / STATE_FILE).exists():
        state = torch.load(out_dir / STATE_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
    started = time.perf_counter() - state["elapsed_s"]
    model.train()
    progress = tqdm(
        range(state["step"], cfg.train.steps), desc=f"train {cfg.name}", initial=state["step"], total=cfg.train.steps
    )
    for step in progress:
        rng = np.random.default_rng([cfg.seed, step])
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout draws: identical after a resume
        inputs, targets = train.batch(rng.integers(0, len(train), size=cfg.train.batch_size))
        inputs.masked_BTL = torch.from_numpy(rng.random(inputs.probs_BTLE.shape[:3]) < cfg.train.mask_prob)
        inputs, targets = _to(inputs, device), _to(targets, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        _, terms = loss_terms(model, inputs, targets, marginal, cfg.loss.routing_mode)
        loss = combine(terms, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        record = {
            "step": step + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train/loss": loss.item(),
            "train/grad_norm": grad_norm.item(),
            **{f"train/{k}": v.item() for k, v in terms.items()},
        }
        stop = False
        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps:
            record.update(validate(model, val, val_indices, marginal, cfg, device))
            score = record["val/routing"]
            if state["best"] is None or score < state["best"]["val/routing"]:
                state["best"] = {k: v for k, v in record.items() if k.startswith("val/")} | {"step": step + 1}
                state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                state["bad_evals"] = 0
            else:
                state["bad_evals"] += 1
                stop = state["bad_evals"] >= cfg.train.patience  # early stopping on the validation routing loss
        state["history"].append(record)
        tracker.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
        progress.set_postfix(loss=f"{record['train/loss']:.3f}")
        state["step"] = step + 1
        if stop:
            break
        if (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < cfg.train.steps:
            state["elapsed_s"] = time.perf_counter() - started
            torch.save(
                {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                out_dir / f"{STATE_FILE}.tmp",
            )
            os.replace(out_dir / f"{STATE_FILE}.tmp", out_dir / STATE_FILE)
    progress.close()
    geometry = {"num_layers": num_layers, "num_experts": num_experts, "hidden_size": hidden_size}
    return _finish(cfg, store, out_dir, state, time.perf_counter() - started, geometry)


def _finish(cfg: TrainConfig, store: TraceStore, out_dir: Path, state: dict, seconds: float, geometry: dict) -> dict:
    """Write the best weights, curves, metrics and (last) predictor.json; drop the training state."""
    best_state = state["best_state"]
    save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, out_dir / "model.safetensors.tmp")
    os.replace(out_dir / "model.safetensors.tmp", out_dir / "model.safetensors")
    pd.DataFrame(state["history"]).to_csv(out_dir / "curves.csv", index=False)
    metrics = {"best": state["best"], "steps_run": state["step"], "train_time_s": seconds,
               "parameters": sum(v.numel() for v in best_state.values())}  # fmt: skip
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    meta = {
        "type": "learned",
        "name": cfg.name,
        "kind": str(cfg.predictor.kind),
        "seed": cfg.seed,
        "model": store.manifest["model"]["name"],
        "traces_fingerprint": traces_fingerprint(store),
        "geometry": geometry,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    tmp = out_dir / "predictor.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / "predictor.json")  # last: marks a finished run
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    return metrics
