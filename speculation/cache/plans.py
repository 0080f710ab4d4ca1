"""Prefetch plans: which experts each policy copies ahead, for which layer, issued at which layer.

A plan is ``plan_TLR[t, m, r]``: the r-th expert to prefetch for token t's MoE layer m (-1: none), with
``issue_layer_L[m]``: the layer of the same token at which those copies are issued. With lookahead d every target
layer m >= 1 is prefetched once, as early as the lookahead allows: from layer m - d, or from layer 0 for m < d
(using lookahead m there). Layer 0 cannot be predicted by the token itself and is always fetched on demand.

Shape legend (docs/glossary.md): T replayed tokens, L MoE layers, K expert slots, D lookaheads, R ranked experts
(the most a prefetch may copy per target layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from speculation.errors import UserError
from speculation.predictors.base import Predictor
from speculation.traces import TraceStore
from speculation.traces.batches import first_rows, load_batch


@dataclass
class RankedPredictions:
    """A predictor's ranked experts and confidence for every (token, source layer, lookahead)."""

    ranked_TLDR: np.ndarray  # int16 experts in decreasing predicted probability; -1 where not predicted
    confidence_TLD: np.ndarray  # float32; NaN where not predicted

    @property
    def max_lookahead(self) -> int:
        reachable = ~np.isnan(self.confidence_TLD[:, 0, :]).all(axis=0)
        return int(np.flatnonzero(reachable).max()) + 1 if reachable.any() else 0


@dataclass
class ReplayTrace:
    """The tokens the simulator replays: the first whole sequences of a split, in decode order."""

    experts_TLK: np.ndarray  # int32, -1 = unused or dropped slot
    num_experts: int
    predictions: dict[str, RankedPredictions]  # by method name


def issue_layers(num_layers: int, lookahead: int) -> np.ndarray:
    """The layer at which each target layer's prefetch is issued (-1 for layer 0: it has no earlier layer)."""
    return np.array([-1] + [max(0, m - lookahead) for m in range(1, num_layers)], dtype=np.int64)


def oracle_plan(experts_TLK: np.ndarray) -> np.ndarray:
    """The router's real choice, known in advance: a perfect predictor with the same issue times."""
    return experts_TLK.astype(np.int32, copy=True)


def no_plan(experts_TLK: np.ndarray) -> np.ndarray:
    return np.full((*experts_TLK.shape[:2], 1), -1, dtype=np.int32)


def _due(predictions: RankedPredictions, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranked experts [T, L, R] and confidence [T, L] of the prediction each target layer uses."""
    num_tokens, num_layers = predictions.ranked_TLDR.shape[:2]
    ranked = np.full((num_tokens, num_layers, predictions.ranked_TLDR.shape[3]), -1, dtype=np.int32)
    confidence = np.zeros((num_tokens, num_layers), dtype=np.float32)
    for target, source in enumerate(issue_layers(num_layers, lookahead)):
        if source < 0:
            continue
        d = target - source
        if d > predictions.ranked_TLDR.shape[2]:
            raise UserError(f"lookahead {d} was not predicted (the predictions reach d <= {predictions.max_lookahead})")
        ranked[:, target] = predictions.ranked_TLDR[:, source, d - 1]
        confidence[:, target] = predictions.confidence_TLD[:, source, d - 1]
    return ranked, confidence


def topb_plan(predictions: RankedPredictions, lookahead: int, budget: int) -> np.ndarray:
    """The predictor's ``budget`` most likely experts for every target layer."""
    ranked, _ = _due(predictions, lookahead)
    return np.ascontiguousarray(ranked[:, :, :budget])


def confidence_plan(predictions: RankedPredictions, lookahead: int, low: float, high: float, budget: int) -> np.ndarray:
    """One expert where the predictor is confident (>= ``high``), ``budget`` where unsure, none below ``low``."""
    ranked, confidence = _due(predictions, lookahead)
    count = np.where(confidence >= high, 1, np.where(confidence >= low, budget, 0))
    plan = ranked[:, :, :budget].copy()
    plan[np.arange(budget)[None, None, :] >= count[:, :, None]] = -1
    return plan


def rank_predictions(
    store: TraceStore,
    split: str,
    predictors: Sequence[Predictor],
    max_tokens: int,
    max_lookahead: int,
    max_budget: int,
) -> ReplayTrace:
    """Run every predictor causally on the replayed tokens and keep its ``max_budget`` best experts per entry.

    ``max_lookahead`` leaves a target layer (``speculation.config.rules`` checked it at start).
    """
    batch = load_batch(store, split, first_rows(store, split, max_tokens))
    num_tokens, num_layers = batch.experts_NLK.shape[:2]
    assert max_lookahead < num_layers, f"lookahead {max_lookahead} leaves the traces' {num_layers} MoE layers"
    predictions = {}
    for predictor in tqdm(predictors, desc="rank predictions", unit="method"):
        ranked = np.full((num_tokens, num_layers, max_lookahead, max_budget), -1, dtype=np.int16)
        confidence = np.full((num_tokens, num_layers, max_lookahead), np.nan, dtype=np.float32)
        for layer in range(num_layers - 1):
            asked = predictor.lookaheads_at(layer, num_layers, max_lookahead)
            if not asked:
                continue
            prediction = predictor.predict(batch, layer, asked)
            order = np.argsort(-prediction.probs_NDE, axis=-1, kind="stable")[..., :max_budget]
            for j, d in enumerate(asked):
                ranked[:, layer, d - 1] = order[:, j]
                confidence[:, layer, d - 1] = prediction.confidence_ND[:, j]
        predictions[predictor.name] = RankedPredictions(ranked, confidence)
    return ReplayTrace(batch.experts_NLK.astype(np.int32), store.num_experts, predictions)
