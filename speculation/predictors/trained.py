"""A trained predictor behind the shared :class:`Predictor` interface, for ``spec-evaluate``.

Shape legend (docs/glossary.md): N token rows, B sequences (batch), T tokens per sequence (padded), L MoE layers,
D lookaheads, E experts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from speculation.config.predictor import PredictorConfig, PredictorKind
from speculation.config.stages import seed_group
from speculation.errors import UserError
from speculation.io import file_sha256
from speculation.predictors.base import Prediction, Predictor
from speculation.predictors.learned import PredictorInputs, build_model
from speculation.predictors.routers import RouterBank
from speculation.traces.batches import TraceBatch
from speculation.workdir import PREDICTOR_FILE, WEIGHTS_FILE

RUN_KEYS = ("type", "name", "traces_fingerprint", "geometry", "config", "weights_sha256")


def retrain_fix(run_dir: Path) -> str:
    return (
        f"retrain it (spec-train with the config in its {PREDICTOR_FILE} and train.overwrite=true) or delete {run_dir}"
    )


def read_run(run_dir: Path) -> dict:
    """A finished run's ``predictor.json``, with its weights file checked against the recorded sha256.

    Every problem is one :class:`UserError` naming the file and the fix.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / PREDICTOR_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{meta_path} is not valid JSON ({err}); delete {run_dir} and retrain it.") from None
    missing = [key for key in RUN_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(
            f"{meta_path} lacks {missing} (an older version or a broken write); delete {run_dir} and retrain it."
        )
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} is missing; {retrain_fix(run_dir)}.")
    actual = file_sha256(weights)
    if actual != meta["weights_sha256"]:
        raise UserError(
            f"{weights} is corrupted: sha256 {actual[:16]}… differs from the {meta['weights_sha256'][:16]}… "
            f"recorded in {PREDICTOR_FILE}; {retrain_fix(run_dir)}."
        )
    return meta


def load_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model``; a UserError if the file does not fit it or holds NaN / inf."""
    weights = Path(run_dir) / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except SafetensorError as err:
        raise UserError(f"{weights} is not a readable safetensors file ({err}); {retrain_fix(run_dir)}.") from None
    broken = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise UserError(f"{weights} holds NaN or inf in {broken[:3]} (lower train.lr); {retrain_fix(run_dir)}.")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"{weights} does not fit the architecture in its {PREDICTOR_FILE} ({first}); {retrain_fix(run_dir)}."
        ) from None


def load_model(run_dir: Path, meta: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """A finished run's model in eval mode and its ``predictor.json`` (files checked by :func:`read_run` and
    :func:`load_weights`); ``meta``: that file as :func:`read_run` returned it, when the caller has read it already.
    Needs no trace store: the geometry is in ``predictor.json``."""
    meta = meta if meta is not None else read_run(run_dir)
    saved = dict(meta["config"]["predictor"])
    config = PredictorConfig(**{**saved, "kind": PredictorKind(saved["kind"])})
    geometry = meta["geometry"]
    routers = RouterBank(geometry["routers"]) if geometry.get("routers") else None  # weights: model.safetensors
    model = build_model(geometry["num_layers"], geometry["num_experts"], geometry["hidden_size"], config, routers)
    load_weights(model, run_dir)
    return model.eval(), meta


class TrainedPredictor(Predictor):
    """Runs the model once per evaluation batch (all source layers at once) and serves each layer's slice."""

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        max_lookahead: int,
        sequences_per_forward: int = 64,
        kind: str = "",
        trained_on_corpus: str | None = None,
    ):
        self.model = model.eval()
        self.name = name
        self.kind = kind  # the model kind (predictor.kind): what a measured cost profile is keyed by
        self.trained_on_corpus = trained_on_corpus  # the corpus fingerprint of its training traces (None: unknown)
        self.group = seed_group(name)
        self.max_lookahead = max_lookahead
        self.sequences_per_forward = sequences_per_forward
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_dir(cls, run_dir: Path, meta: dict | None = None) -> TrainedPredictor:
        """Load a finished run (:func:`load_model`)."""
        model, meta = load_model(run_dir, meta)
        saved = meta["config"]["predictor"]
        # trained_on_corpus is absent from runs made before it was recorded
        return cls(model, meta["name"], int(saved["max_lookahead"]), kind=str(saved["kind"]),
                   trained_on_corpus=meta.get("trained_on_corpus"))  # fmt: skip

    @torch.no_grad()
    def _outputs(self, batch: TraceBatch) -> tuple[np.ndarray, np.ndarray]:
        """probs [N, L, D, E] and confidence [N, L, D] for every row of ``batch`` (cached for the batch)."""
        if self._cache is not None and self._cache[0] == id(batch):
            return self._cache[1], self._cache[2]
        if batch.hidden_NLH is None or batch.hidden_layers != list(range(batch.probs_NLE.shape[1])):
            raise UserError(f"{self.name} needs the hidden states of every MoE layer; re-collect with them.")
        starts = np.flatnonzero(np.r_[True, batch.seq_N[1:] != batch.seq_N[:-1]])
        lengths = np.diff(np.r_[starts, batch.num_rows])
        num_rows, num_layers, num_experts = batch.probs_NLE.shape
        probs = np.zeros((num_rows, num_layers, self.max_lookahead, num_experts), dtype=np.float32)
        confidence = np.zeros((num_rows, num_layers, self.max_lookahead), dtype=np.float32)
        for first in range(0, len(starts), self.sequences_per_forward):
            chunk = slice(first, first + self.sequences_per_forward)
            width = int(lengths[chunk].max())
            offsets = np.arange(width)
            mask_BT = offsets[None, :] < lengths[chunk, None]
            rows_BT = np.where(mask_BT, starts[chunk, None] + offsets[None, :], 0)
            inputs = PredictorInputs(
                probs_BTLE=torch.from_numpy(batch.probs_NLE[rows_BT]),
                hidden_BTLH=torch.from_numpy(batch.hidden_NLH[rows_BT]),
                mask_BT=torch.from_numpy(mask_BT),
            )
            out = self.model(inputs)
            real = rows_BT[mask_BT]
            probs[real] = torch.softmax(out.logits_BTLDE.float(), -1).numpy()[mask_BT]
            confidence[real] = out.confidence_BTLD.float().numpy()[mask_BT]
        self._cache = (id(batch), probs, confidence)
        return probs, confidence

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        bad = [d for d in lookaheads if not 1 <= d <= self.max_lookahead]
        if bad:
            raise UserError(f"{self.name} predicts lookaheads 1..{self.max_lookahead}; asked for {bad}.")
        probs, confidence = self._outputs(batch)
        columns = [d - 1 for d in lookaheads]
        return Prediction(probs_NDE=probs[:, layer, columns], confidence_ND=confidence[:, layer, columns])


def kind_of(method: Predictor) -> str:
    """What metrics.csv's ``kind`` and simulation.csv's ``predictor_kind`` say of a method: a trained predictor's
    model kind, else (a heuristic or baseline) its own name."""
    return method.kind if isinstance(method, TrainedPredictor) else method.name
