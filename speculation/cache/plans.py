"""Prefetch plans: which experts each policy copies ahead, for which layer, issued at which layer.

A :class:`Plan` lists, per token t, target MoE layer m and source h, the candidate experts (best first, -1: none)
and their probabilities, predicted at layer ``sources_LH[m, h]`` of the same token. With lookahead d every target
layer m >= 1 is predicted once, as early as the lookahead allows: from layer m - d, or from layer 0 for m < d
(using lookahead m there); a multi-horizon plan predicts it from every layer m - 1 .. m - d. Layer 0 cannot be
predicted by the token itself and is always fetched on demand.

Shape legend (docs/glossary.md): T replayed tokens, L MoE layers, K expert slots, D lookaheads, H source layers
per target, R ranked experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from speculation.errors import UserError
from speculation.predictors.base import Predictor
from speculation.traces import TraceStore
from speculation.traces.batches import first_rows, load_batch


@dataclass
class RankedPredictions:
    """A predictor's ranked experts, their probabilities and its confidence for every (token, source layer,
    lookahead)."""

    ranked_TLDR: np.ndarray  # int16 experts in decreasing predicted probability; -1 where not predicted
    confidence_TLD: np.ndarray  # float32; NaN where not predicted
    probs_TLDR: np.ndarray | None = None  # float32 probabilities of ranked_TLDR; None: unknown (NaN in plans)

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
    kinds: dict[str, str] = field(default_factory=dict)  # method name -> learned model kind ("" for the others)


@dataclass
class Plan:
    """What a policy may prefetch: candidates ``experts_TLHR[t, m, h]`` for token t's layer m, predicted at its
    layer ``sources_LH[m, h]`` (-1: none), with their probabilities (NaN: unknown)."""

    experts_TLHR: np.ndarray  # int32, -1 = none
    probs_TLHR: np.ndarray  # float32
    sources_LH: np.ndarray  # int64


def issue_layers(num_layers: int, lookahead: int) -> np.ndarray:
    """The layer at which each target layer's prefetch is issued (-1 for layer 0: it has no earlier layer)."""
    return np.array([-1] + [max(0, m - lookahead) for m in range(1, num_layers)], dtype=np.int64)


def source_layers(num_layers: int, lookahead: int, multi_horizon: bool = False) -> np.ndarray:
    """[L, H] layers predicting each target layer: one, ``issue_layers``; or with ``multi_horizon`` every layer
    ``m - 1, ..., m - lookahead`` that exists (H = lookahead, nearest first, -1 where there is none)."""
    if not multi_horizon:
        return issue_layers(num_layers, lookahead)[:, None]
    sources = np.full((num_layers, lookahead), -1, dtype=np.int64)
    for m in range(1, num_layers):
        for h in range(min(lookahead, m)):
            sources[m, h] = m - 1 - h
    return sources


def oracle_plan(experts_TLK: np.ndarray, lookahead: int) -> Plan:
    """The router's real choice, known in advance and certain: a perfect predictor with the same issue times."""
    num_layers = experts_TLK.shape[1]
    plan = experts_TLK.astype(np.int32)[:, :, None, :]
    return Plan(plan, np.where(plan >= 0, 1.0, np.nan).astype(np.float32), source_layers(num_layers, lookahead))


def no_plan(experts_TLK: np.ndarray) -> Plan:
    num_tokens, num_layers = experts_TLK.shape[:2]
    return Plan(np.full((num_tokens, num_layers, 1, 1), -1, dtype=np.int32),
                np.full((num_tokens, num_layers, 1, 1), np.nan, dtype=np.float32),
                np.full((num_layers, 1), -1, dtype=np.int64))  # fmt: skip


def _due(predictions: RankedPredictions, sources_LH: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranked experts and probabilities [T, L, H, R] and confidence [T, L, H] of the predictions each target layer
    uses from each of its source layers."""
    ranked_TLDR = predictions.ranked_TLDR
    num_tokens, num_layers, max_d, width = ranked_TLDR.shape
    horizons = sources_LH.shape[1]
    ranked = np.full((num_tokens, num_layers, horizons, width), -1, dtype=np.int32)
    probs = np.full(ranked.shape, np.nan, dtype=np.float32)
    confidence = np.zeros((num_tokens, num_layers, horizons), dtype=np.float32)
    for target in range(num_layers):
        for h, source in enumerate(sources_LH[target]):
            if source < 0:
                continue
            d = target - source
            if d > max_d:
                reach = predictions.max_lookahead
                raise UserError(f"lookahead {d} was not predicted (the predictions reach d <= {reach})")
            ranked[:, target, h] = ranked_TLDR[:, source, d - 1]
            confidence[:, target, h] = predictions.confidence_TLD[:, source, d - 1]
            if predictions.probs_TLDR is not None:
                probs[:, target, h] = predictions.probs_TLDR[:, source, d - 1]
    return ranked, probs, confidence


def topb_plan(predictions: RankedPredictions, lookahead: int, budget: int) -> Plan:
    """The predictor's ``budget`` most likely experts for every target layer."""
    sources = source_layers(predictions.ranked_TLDR.shape[1], lookahead)
    ranked, probs, _ = _due(predictions, sources)
    return Plan(np.ascontiguousarray(ranked[..., :budget]), np.ascontiguousarray(probs[..., :budget]), sources)


def confidence_plan(predictions: RankedPredictions, lookahead: int, low: float, high: float, budget: int) -> Plan:
    """One expert where the predictor is confident (>= ``high``), ``budget`` where unsure, none below ``low``."""
    sources = source_layers(predictions.ranked_TLDR.shape[1], lookahead)
    ranked, probs, confidence = _due(predictions, sources)
    count = np.where(confidence >= high, 1, np.where(confidence >= low, budget, 0))
    plan = ranked[..., :budget].copy()
    plan[np.arange(budget) >= count[..., None]] = -1
    return Plan(plan, np.ascontiguousarray(probs[..., :budget]), sources)


def candidate_plan(predictions: RankedPredictions, lookahead: int, candidates: int, multi_horizon: bool) -> Plan:
    """The ``candidates`` most likely experts with their probabilities, for a cost-aware policy to choose from at
    issue time: from layer ``m - lookahead`` only, or with ``multi_horizon`` from every layer up to ``lookahead``
    ahead (early with the long lead, again closer with the sharper prediction)."""
    sources = source_layers(predictions.ranked_TLDR.shape[1], lookahead, multi_horizon)
    ranked, probs, _ = _due(predictions, sources)
    return Plan(np.ascontiguousarray(ranked[..., :candidates]), np.ascontiguousarray(probs[..., :candidates]), sources)


def rank_predictions(
    store: TraceStore,
    split: str,
    predictors: Sequence[Predictor],
    max_tokens: int,
    max_lookahead: int,
    max_ranked: int,
) -> ReplayTrace:
    """Run every predictor causally on the replayed tokens; keep its ``max_ranked`` best experts per entry, with
    their probabilities.

    ``max_lookahead`` leaves a target layer (``speculation.config.rules`` checked it at start).
    """
    batch = load_batch(store, split, first_rows(store, split, max_tokens))
    num_tokens, num_layers = batch.experts_NLK.shape[:2]
    assert max_lookahead < num_layers, f"lookahead {max_lookahead} leaves the traces' {num_layers} MoE layers"
    predictions = {}
    for predictor in tqdm(predictors, desc="rank predictions", unit="method"):
        ranked = np.full((num_tokens, num_layers, max_lookahead, max_ranked), -1, dtype=np.int16)
        probs = np.full(ranked.shape, np.nan, dtype=np.float32)
        confidence = np.full((num_tokens, num_layers, max_lookahead), np.nan, dtype=np.float32)
        for layer in range(num_layers - 1):
            asked = predictor.lookaheads_at(layer, num_layers, max_lookahead)
            if not asked:
                continue
            prediction = predictor.predict(batch, layer, asked)
            order = np.argsort(-prediction.probs_NDE, axis=-1, kind="stable")[..., :max_ranked]
            best = np.take_along_axis(prediction.probs_NDE, order, axis=-1)
            for j, d in enumerate(asked):
                ranked[:, layer, d - 1] = order[:, j]
                probs[:, layer, d - 1] = best[:, j]
                confidence[:, layer, d - 1] = prediction.confidence_ND[:, j]
        predictions[predictor.name] = RankedPredictions(ranked, confidence, probs)
    kinds = {predictor.name: getattr(predictor, "kind", "") for predictor in predictors}
    return ReplayTrace(batch.experts_NLK.astype(np.int32), store.num_experts, predictions, kinds)
