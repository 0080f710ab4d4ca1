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
from safetensors.torch import load_file

from speculation.config.predictor import PredictorConfig, PredictorKind
from speculation.config.stages import seed_group
from speculation.predictors.base import Prediction, Predictor
from speculation.predictors.learned import PredictorInputs, build_model
from speculation.traces import TraceStore
from speculation.traces.batches import TraceBatch
from speculation.workdir import PREDICTOR_FILE, WEIGHTS_FILE


class TrainedPredictor(Predictor):
    """Runs the model once per evaluation batch (all source layers at once) and serves each layer's slice."""

    def __init__(self, model: torch.nn.Module, name: str, max_lookahead: int, sequences_per_forward: int = 64):
        self.model = model.eval()
        self.name = name
        self.group = seed_group(name)
        self.max_lookahead = max_lookahead
        self.sequences_per_forward = sequences_per_forward
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_dir(cls, run_dir: Path, store: TraceStore) -> TrainedPredictor:
        meta = json.loads((Path(run_dir) / PREDICTOR_FILE).read_text())
        saved = dict(meta["config"]["predictor"])
        config = PredictorConfig(**{**saved, "kind": PredictorKind(saved["kind"])})
        geometry = meta["geometry"]
        model = build_model(geometry["num_layers"], geometry["num_experts"], geometry["hidden_size"], config)
        model.load_state_dict(load_file(Path(run_dir) / WEIGHTS_FILE))
        return cls(model, meta["name"], config.max_lookahead)

    @torch.no_grad()
    def _outputs(self, batch: TraceBatch) -> tuple[np.ndarray, np.ndarray]:
        """probs [N, L, D, E] and confidence [N, L, D] for every row of ``batch`` (cached for the batch)."""
        if self._cache is not None and self._cache[0] == id(batch):
            return self._cache[1], self._cache[2]
        if batch.hidden_NLH is None or batch.hidden_layers != list(range(batch.probs_NLE.shape[1])):
            raise ValueError(f"{self.name} needs the hidden states of every MoE layer; re-collect with them.")
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
            raise ValueError(f"{self.name} predicts lookaheads 1..{self.max_lookahead}; asked for {bad}.")
        probs, confidence = self._outputs(batch)
        columns = [d - 1 for d in lookaheads]
        return Prediction(probs_NDE=probs[:, layer, columns], confidence_ND=confidence[:, layer, columns])
