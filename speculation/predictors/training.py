"""Train a learned predictor on a trace store: masked multi-term loss, early stopping, resumable.

``Workdir.run(name)`` ends up with ``identity.json`` (written first: the config and traces the run belongs to),
``model.safetensors`` (the best validation checkpoint), ``predictor.json`` (type, traces fingerprint, config, the
weights' sha256: what ``spec-evaluate`` loads; written last, it marks a finished run), ``metrics.json`` and
``curves.csv`` (every loss term at every step). ``training_state.pt`` exists while training runs, so a killed run
resumes; a rerun, a resume and a reuse all present their identity first, so a run is never continued or reused
under another config. The loop is :func:`speculation.trainer.train_loop`: every step's windows, masks and
dropout draws derive from ``(seed, step)``, so a resumed run takes exactly the steps an uninterrupted one would.

Under ``torchrun --nproc-per-node N`` (``ranks``) the run is data-parallel and its results do not depend on N:
step ``s``'s global batch and masks are drawn as in a single process, and each rank takes a contiguous share of
the rows (:func:`speculation.distributed.share`); every loss term's batch sums are summed over ranks
(:func:`speculation.distributed.total`), so each rank's loss is the global batch's and the gradient averaged
over ranks is its gradient. Validation deals the fixed batches round-robin and sums over ranks, so every rank sees the
single-process numbers and stops early at the same step. Rank 0 alone claims, reuses and writes the run. Only
dropout differs from a single process: a rank draws its masks for its own rows (``trainer.step_seed``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from speculation.config.predictor import LOSS_TERMS, LossConfig, PredictorConfig
from speculation.config.rules import learned_input_problem
from speculation.config.stages import PLACEMENT_KEYS, TrainConfig
from speculation.distributed import SINGLE_PROCESS, Ranks, main_decides, share, total
from speculation.environment import environment
from speculation.errors import UserError
from speculation.identity import claim_identity, flatten
from speculation.io import atomic_path, atomic_write_json, file_sha256, remove_stale_temps
from speculation.losses import Total, combine, confidence_loss, consistency_loss, diversity_loss, local, routing_loss
from speculation.predictors.learned import PredictorInputs, build_model, learned_parameters
from speculation.predictors.routers import RouterBank
from speculation.predictors.trained import read_run
from speculation.predictors.windows import Targets, top1_marginal, window_tensors
from speculation.traces import SequenceDataset, TraceStore
from speculation.tracking import Tracker
from speculation.trainer import LoopState, train_loop
from speculation.workdir import CURVES_FILE, IDENTITY_FILE, METRICS_FILE, PREDICTOR_FILE, STATE_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)


def check_store(store: TraceStore, predictor: PredictorConfig | None = None) -> None:
    """The learned predictors read every layer's hidden state (the real one, if ``predictor`` uses the traced
    routers) and need train and val; one clear error if not."""
    hidden = store.manifest.hidden
    width = hidden.projection.width if hidden.projection else None
    problem = learned_input_problem(
        predictor or PredictorConfig(), hidden.layers, store.num_layers, width, str(store.root)
    )
    if problem:
        raise UserError(problem)
    for split in ("train", "val"):
        if split not in store.splits or store.split(split).num_rows == 0:
            raise UserError(f"{store.root} has no {split!r} split with tokens; spec-train needs train and val.")


class WindowSource:
    """Whole traced sequences of a split as padded windows, batched by index."""

    def __init__(self, store: TraceStore, split: str, max_lookahead: int, miss_window: int | None = None) -> None:
        self.dataset = SequenceDataset(store.split(split), fields=("experts", "logits", "hidden"))
        self.score = store.manifest.routing.score
        self.max_lookahead = max_lookahead
        self.miss_window = miss_window

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: np.ndarray) -> tuple[PredictorInputs, Targets]:
        items = [self.dataset[int(i)] for i in indices]
        stack = {
            key: torch.stack([item[key] for item in items]).numpy() for key in ("experts", "logits", "hidden", "mask")
        }
        return window_tensors(
            stack["experts"], stack["logits"], stack["hidden"], stack["mask"], self.score, self.max_lookahead,
            self.miss_window,
        )  # fmt: skip


def loss_terms(
    model, inputs: PredictorInputs, targets: Targets, marginal_LDE, loss: LossConfig, total: Total = local
) -> tuple:
    """The model's outputs and every loss term on a batch; ``total`` sums the terms' batch sums over the ranks that
    share a global batch (``speculation.losses``)."""
    outputs = model(inputs)
    logits, top1, valid = outputs.logits_BTLDE, targets.top1_BTLD, targets.valid_BTLD
    weight = 1.0 + loss.miss_weight * targets.miss_BTLD.float() if targets.miss_BTLD is not None else None
    terms = {
        "routing": routing_loss(logits, top1, targets.probs_BTLDE, valid, loss.routing_mode, weight, total),
        "confidence": confidence_loss(logits, outputs.confidence_BTLD, top1, valid, total),
        "consistency": consistency_loss(logits, targets.pair_BT, valid, total),
        "diversity": diversity_loss(logits, valid, marginal_LDE, total),
    }
    return outputs, terms


@torch.no_grad()
def validate(
    model,
    source: WindowSource,
    indices: np.ndarray,
    marginal_LDE,
    cfg: TrainConfig,
    device,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict:
    """Mean loss terms and top-1 accuracy per lookahead on fixed validation windows (no masking).

    Batch ``k`` of the windows runs on rank ``k % world`` and the sums are summed over ranks: every rank gets the
    numbers a single process would, whatever the rank count."""
    model.eval()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    correct = np.zeros(cfg.predictor.max_lookahead)
    count = np.zeros(cfg.predictor.max_lookahead)
    for batch, start in enumerate(range(0, len(indices), cfg.train.batch_size)):
        if not ranks.owns(batch):
            continue
        inputs, targets = source.batch(indices[start : start + cfg.train.batch_size])
        inputs, targets = _to(inputs, device), _to(targets, device)
        outputs, terms = loss_terms(model, inputs, targets, marginal_LDE, cfg.loss)
        for name, value in terms.items():
            sums[name] += float(value)
        hits = (outputs.logits_BTLDE.argmax(-1) == targets.top1_BTLD) & targets.valid_BTLD
        correct += hits.sum((0, 1, 2)).cpu().numpy()
        count += targets.valid_BTLD.sum((0, 1, 2)).cpu().numpy()
    packed = torch.from_numpy(np.concatenate([list(sums.values()), correct, count]))  # float64: counts stay exact
    packed = total(packed)  # a plain run: the identity
    sums = dict(zip(sums, packed[: len(sums)].tolist(), strict=True))
    correct, count = np.split(packed[len(sums) :].numpy(), 2)
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


def _learning_config(cfg: TrainConfig) -> dict:
    config = flatten(json.loads(json.dumps(asdict(cfg), default=str)))
    return {k: v for k, v in config.items() if not any(k == p or k.startswith(p + ".") for p in PLACEMENT_KEYS)}


def run_identity(cfg: TrainConfig, store: TraceStore) -> dict:
    """What determines a run's weights: every config value but ``PLACEMENT_KEYS``, and the traces' model."""
    return {"traces_fingerprint": store.manifest.fingerprint(), **_learning_config(cfg)}


def claim_run(cfg: TrainConfig, store: TraceStore, out_dir: Path) -> None:
    """Make ``out_dir`` this config's run: new, or one it may resume or reuse; a UserError if it holds another."""
    fix = "Pass run_name=NAME to train a new run beside it, or train.overwrite=true to replace it."
    if cfg.train.overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / IDENTITY_FILE).exists():
        raise UserError(f"{out_dir} holds a run without {IDENTITY_FILE} (an older version wrote it). {fix}")
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = _learning_config(TrainConfig())  # an option added since the run was made matches at its default
    identity = run_identity(cfg, store)
    claim_identity(out_dir / IDENTITY_FILE, identity, "a run with another config or traces", fix, defaults)


def check_ranks(cfg: TrainConfig, ranks: Ranks) -> None:
    """Every rank needs at least one window of each step's global batch."""
    if cfg.train.batch_size < ranks.world:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is smaller than the {ranks.world} ranks torchrun started, so "
            f"some rank would get no window of a step; raise train.batch_size to at least {ranks.world} or launch "
            f"at most {cfg.train.batch_size} ranks (--nproc-per-node)."
        )


def train_predictor(
    cfg: TrainConfig,
    store: TraceStore,
    out_dir: Path,
    device: torch.device,
    tracker: Tracker,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict:
    """Train, resume or reuse the predictor of ``cfg`` in ``out_dir``; returns its metrics (on every rank).

    A finished run is reused only when its identity (:func:`run_identity`) matches and its weights match their
    checksum; a run that fails before its first checkpoint leaves no directory behind. Under torchrun every rank
    calls this; rank 0 alone claims, reuses and writes the run.
    """
    check_ranks(cfg, ranks)
    check_store(store, cfg.predictor)
    existed = out_dir.exists() and not cfg.train.overwrite  # overwrite: this run starts from nothing
    finished = main_decides(lambda: _claim(cfg, store, out_dir))  # so no rank reads the directory before it is ready
    if finished is not None:
        return finished
    try:
        return _train(cfg, store, out_dir, device, tracker, ranks)
    except BaseException:
        if ranks.is_main and not existed and not (out_dir / STATE_FILE).exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing to resume: leave nothing that looks like a run
        raise


def _claim(cfg: TrainConfig, store: TraceStore, out_dir: Path) -> dict | None:
    """Claim ``out_dir`` for ``cfg``: a finished run's metrics (to reuse it), else None after clearing leftovers."""
    claim_run(cfg, store, out_dir)
    if (out_dir / PREDICTOR_FILE).exists():
        read_run(out_dir)  # a finished run with broken files is refused, never silently reused
        log.info("%s finished earlier with this config and these traces: reusing it", out_dir)
        return json.loads((out_dir / METRICS_FILE).read_text())
    remove_stale_temps(out_dir)
    return None


def _train(
    cfg: TrainConfig, store: TraceStore, out_dir: Path, device: torch.device, tracker: Tracker, ranks: Ranks
) -> dict:
    miss_window = cfg.loss.miss_window if cfg.loss.miss_weight else None  # misses are computed only when weighted
    train, val = (WindowSource(store, s, cfg.predictor.max_lookahead, miss_window) for s in ("train", "val"))
    num_experts = store.num_experts
    marginal = top1_marginal(store.split("train").array("experts"), num_experts, cfg.predictor.max_lookahead).to(device)
    val_indices = np.random.default_rng([cfg.seed, 10**6]).permutation(len(val))[: cfg.train.val_windows]

    torch.manual_seed(cfg.seed)
    geometry = {"num_layers": store.num_layers, "num_experts": num_experts, "hidden_size": store.manifest.hidden.size}
    routers = RouterBank.from_store(store) if cfg.predictor.uses_routers else None  # frozen, saved with the model
    geometry["routers"] = None if routers is None else routers.spec  # what load_model rebuilds them from
    if projection := store.manifest.hidden.projection:  # its inputs are projected: scored only on traces alike
        geometry["hidden_projection"] = {"width": projection.width, "seed": projection.seed}
    model = build_model(geometry["num_layers"], num_experts, geometry["hidden_size"], cfg.predictor, routers)
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    weights = cfg.loss.weights
    rows = share(cfg.train.batch_size, ranks)  # this rank's rows of every global batch

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng([cfg.seed, step])  # the global batch and masks: (seed, step) alone, any rank count
        inputs, targets = train.batch(rng.integers(0, len(train), size=cfg.train.batch_size)[rows])
        masked_BTL = rng.random((cfg.train.batch_size, *inputs.probs_BTLE.shape[1:3])) < cfg.train.mask_prob
        inputs.masked_BTL = torch.from_numpy(masked_BTL[rows])
        inputs, targets = _to(inputs, device), _to(targets, device)
        _, terms = loss_terms(model, inputs, targets, marginal, cfg.loss, total)  # the global batch's terms
        loss = combine(terms, weights)
        return loss, {"train/loss": loss.item(), **{f"train/{k}": v.item() for k, v in terms.items()}}

    def on_eval(step: int, record: dict[str, float], state: LoopState) -> bool:
        """Keep the best checkpoint by validation routing loss; stop after ``patience`` evaluations without one."""
        record.update(validate(model, val, val_indices, marginal, cfg, device, ranks))
        best = state.extra.get("best")
        if best is None or record["val/routing"] < best["val/routing"]:
            state.extra["best"] = {k: v for k, v in record.items() if k.startswith("val/")} | {"step": step}
            state.extra["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state.extra["bad_evals"] = 0
            return False
        state.extra["bad_evals"] += 1
        return state.extra["bad_evals"] >= cfg.train.patience

    state, seconds = train_loop(
        model, optimizer, cfg.train, cfg.seed, out_dir / STATE_FILE, step_fn, on_eval, tracker,
        desc=f"train {cfg.name}", device=device, ranks=ranks,
    )  # fmt: skip
    return main_decides(lambda: _finish(cfg, store, out_dir, state, seconds, geometry, ranks))


def _finish(
    cfg: TrainConfig, store: TraceStore, out_dir: Path, state: LoopState, seconds: float, geometry: dict, ranks: Ranks
) -> dict:
    """Write the best weights, curves, metrics and (last) predictor.json; drop the training state."""
    best_state = state.extra["best_state"]
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, tmp)
        weights_sha256 = file_sha256(tmp)
    with atomic_path(out_dir / CURVES_FILE) as tmp:
        pd.DataFrame(state.history).to_csv(tmp, index=False)
    metrics = {"best": state.extra["best"], "steps_run": state.step, "train_time_s": seconds,
               "environment": environment(),  # the commit, versions and machine (threads: what timed it)
               # how it ran: the results do not depend on it, the time does (environment's threads: per rank)
               "ranks": {"world_size": ranks.world, "threads_per_rank": torch.get_num_threads()},
               "parameters": learned_parameters(best_state.items())}  # fmt: skip
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    meta = {
        "type": "learned",
        "name": cfg.name,
        "kind": str(cfg.predictor.kind),
        "seed": cfg.seed,
        "model": store.manifest.model_name,
        "traces_fingerprint": store.manifest.fingerprint(),
        "trained_on_corpus": (store.manifest.raw.get("corpus") or {}).get("fingerprint"),  # in or out of domain
        "geometry": geometry,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "weights_sha256": weights_sha256,
    }
    atomic_write_json(out_dir / PREDICTOR_FILE, meta)  # last: marks a finished run
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    return metrics
