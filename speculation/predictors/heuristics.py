"""Heuristic and baseline routing predictors: cheap rules every learned predictor must beat.

Shape legend (docs/glossary.md): N token rows, L MoE layers, K expert slots, E experts,
D requested lookaheads. Predicting for MoE layer ``l`` and lookahead ``d`` means a distribution over the experts
of layer ``l + d``; ``d = 0`` (the current layer) is accepted for sanity checks.

Every predictor here except :class:`OraclePredictor` obeys the causality contract of ``base.py``: it reads row
``t`` only at layers ``<= l`` and other rows only if they are earlier tokens of the same sequence. The oracle
reads the answer on purpose: it is the ceiling row of every table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speculation.predictors.base import Prediction, Predictor
from speculation.traces.batches import TraceBatch


def target_layers(batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> list[int]:
    """The layers ``layer + d`` asked for; one clear error for a layer or lookahead outside the trace."""
    num_layers = batch.experts_NLK.shape[1]
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is not an MoE layer of this trace (it has layers 0..{num_layers - 1})")
    bad = [d for d in lookaheads if not 0 <= layer + d < num_layers or d < 0]
    if bad:
        raise ValueError(
            f"lookaheads {bad} from layer {layer} leave the trace's {num_layers} MoE layers; "
            f"ask for d in 0..{num_layers - 1 - layer}"
        )
    return [layer + int(d) for d in lookaheads]


def max_confidence(probs_NDE: np.ndarray) -> Prediction:
    """Renormalise to float32 rows summing to 1 (a new array) and use the max probability as confidence."""
    probs_NDE = np.asarray(probs_NDE, dtype=np.float64)
    probs_NDE = (probs_NDE / probs_NDE.sum(-1, keepdims=True)).astype(np.float32)
    return Prediction(probs_NDE=probs_NDE, confidence_ND=probs_NDE.max(-1))


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"predictor {name!r} has no train statistics; call fit(train_batch, num_experts) first")


# --------------------------------------------------------------------------------------------------- baselines


_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a bijective, well-mixed hash (arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class RandomPredictor(Predictor):
    """A flat-Dirichlet (uniform on the simplex) distribution per (token, lookahead); top-1 uniform over E.

    The draws are a hash of (seed, layer, d, seq, pos, expert) rather than a stateful generator, so a token's
    prediction does not depend on how the split is cut into batches or in which order layers are asked.
    """

    name = "random"

    def __init__(self, seed: int = 0, rows_per_chunk: int = 1 << 16) -> None:
        self.seed = seed
        self.rows_per_chunk = rows_per_chunk  # bounds the uint64 temporaries ([rows, E] per chunk)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        target_layers(batch, layer, lookaheads)
        num_experts = batch.probs_NLE.shape[-1]
        # Row identity: (seq, pos) is unique within a split; casting negative ids wraps, which is still unique.
        row_key_N = _mix64(batch.seq_N.astype(np.uint64)) ^ batch.pos_N.astype(np.uint64)
        expert_E = np.arange(num_experts, dtype=np.uint64)
        probs_NDE = np.empty((batch.num_rows, len(lookaheads), num_experts), np.float32)
        for i, d in enumerate(lookaheads):
            request_key = _mix64(np.array([self.seed & _MASK64], np.uint64))
            request_key = _mix64(request_key ^ np.uint64(layer))
            request_key = _mix64(request_key ^ np.uint64(d))
            for start in range(0, batch.num_rows, self.rows_per_chunk):
                key_N = _mix64(row_key_N[start : start + self.rows_per_chunk] ^ request_key)
                bits_NE = _mix64(key_N[:, None] ^ expert_E[None, :])
                uniform_NE = ((bits_NE >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
                exponential_NE = -np.log(uniform_NE)  # normalised Exp(1) draws = Dirichlet(1, ..., 1)
                probs_NDE[start : start + len(key_N), i] = exponential_NE / exponential_NE.sum(-1, keepdims=True)
        return max_confidence(probs_NDE)


def expert_marginals(experts_NLK: np.ndarray, num_experts: int, smoothing: float) -> np.ndarray:
    """Per-layer smoothed frequency of the selected experts (slots with expert >= 0): [L, E]."""
    num_layers = experts_NLK.shape[1]
    layer_NLK = np.broadcast_to(np.arange(num_layers)[None, :, None], experts_NLK.shape)
    valid = experts_NLK >= 0
    flat = layer_NLK[valid] * num_experts + experts_NLK[valid]
    counts_LE = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    smoothed_LE = counts_LE + smoothing
    return smoothed_LE / smoothed_LE.sum(-1, keepdims=True)


class FrequencyPredictor(Predictor):
    """Layer ``l + d``'s marginal over experts on the train split (add-one smoothed); the same for every token."""

    name = "frequency"

    def __init__(self, smoothing: float = 1.0) -> None:
        self.smoothing = smoothing
        self.marginal_LE: np.ndarray | None = None

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        self.marginal_LE = expert_marginals(train.experts_NLK, num_experts, self.smoothing)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        if self.marginal_LE is None:
            raise _not_fitted(self.name)
        targets = target_layers(batch, layer, lookaheads)
        prior_DE = self.marginal_LE[targets]
        return max_confidence(np.broadcast_to(prior_DE, (batch.num_rows, *prior_DE.shape)))


class PreviousTokenPredictor(Predictor):
    """The previous token's router distribution at layer ``l + d``; the frequency prior at a sequence start.

    Causal: the previous token has finished every layer before the current one starts.
    """

    name = "previous_token"

    def __init__(self, smoothing: float = 1.0) -> None:
        self.prior = FrequencyPredictor(smoothing)

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        self.prior.fit(train, num_experts)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        if self.prior.marginal_LE is None:
            raise _not_fitted(self.name)
        targets = np.array(target_layers(batch, layer, lookaheads))
        prev_N = batch.prev_N
        assert (prev_N < np.arange(batch.num_rows)).all(), "prev_N must point at earlier rows (or be -1)"
        has_prev_N = prev_N >= 0
        previous_NDE = batch.probs_NLE[np.maximum(prev_N, 0)[:, None], targets[None, :]]
        prior_DE = self.prior.marginal_LE[targets]
        return max_confidence(np.where(has_prev_N[:, None, None], previous_NDE, prior_DE[None]))


class OraclePredictor(Predictor):
    """The router's own decision at layer ``l + d`` (NOT causal: the ceiling every table reports).

    Where the router's distribution already ranks the selected experts first (plain top-k routing), the oracle is
    that distribution itself: every metric is at its best, KL included. Where the selection departs from it
    (capacity, group limits, DeepSeek-V3's biased scores), ``selected_mass`` goes to the selected experts in
    proportion to their gates and the rest follows the router distribution so that KL stays finite. Tokens with
    no selected expert (dropped) get the router distribution.
    """

    name = "oracle"

    def __init__(self, selected_mass: float = 0.999) -> None:
        self.selected_mass = selected_mass

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        targets = target_layers(batch, layer, lookaheads)
        experts_NDK = batch.experts_NLK[:, targets]
        valid_NDK = experts_NDK >= 0
        weights_NDK = np.where(valid_NDK, np.maximum(batch.gates_NLK[:, targets], 0), 0).astype(np.float64)
        total_ND1 = weights_NDK.sum(-1, keepdims=True)
        # A selected expert whose gate underflowed to 0 (fp16 traces) still counts: fall back to equal weights.
        equal_NDK = valid_NDK / np.maximum(valid_NDK.sum(-1, keepdims=True), 1)
        weights_NDK = np.where(total_ND1 > 0, weights_NDK / np.where(total_ND1 > 0, total_ND1, 1), equal_NDK)
        router_NDE = batch.probs_NLE[:, targets].astype(np.float64)
        selected_NDE = np.zeros_like(router_NDE)
        for slot in range(experts_NDK.shape[-1]):
            # One index per row per slot, so put_along_axis never collides; an unused slot adds 0 at expert 0.
            index_ND1 = np.maximum(experts_NDK[..., slot : slot + 1], 0)
            current_ND1 = np.take_along_axis(selected_NDE, index_ND1, -1)
            np.put_along_axis(selected_NDE, index_ND1, current_ND1 + weights_NDK[..., slot : slot + 1], -1)
        any_ND = valid_NDK.any(-1)
        mixed_NDE = self.selected_mass * selected_NDE + (1 - self.selected_mass) * router_NDE
        # Does the router distribution rank the selection first, slot 0 on top? Then it is the oracle as is.
        order_NDE = np.argsort(-router_NDE, axis=-1, kind="stable")
        rank_NDE = np.empty_like(order_NDE)
        np.put_along_axis(rank_NDE, order_NDE, np.arange(router_NDE.shape[-1])[None, None, :], -1)
        size_ND1 = valid_NDK.sum(-1, keepdims=True)
        ranks_NDK = np.take_along_axis(rank_NDE, np.maximum(experts_NDK, 0), -1)
        agrees_ND = (np.where(valid_NDK, ranks_NDK < size_ND1, True).all(-1)) & (ranks_NDK[..., 0] == 0)
        oracle_NDE = np.where((any_ND & ~agrees_ND)[..., None], mixed_NDE, router_NDE)
        prediction = max_confidence(oracle_NDE)
        prediction.confidence_ND = np.where(any_ND, 1.0, prediction.confidence_ND).astype(np.float32)
        return prediction


# -------------------------------------------------------------------------------------------------- heuristics


class LayerMinus1Predictor(Predictor):
    """Layer ``l``'s router distribution as the guess for every later layer ("same expert as layer l")."""

    name = "layer_minus_1"

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        targets = target_layers(batch, layer, lookaheads)
        current_N1E = batch.probs_NLE[:, layer : layer + 1]
        return max_confidence(np.repeat(current_N1E, len(targets), axis=1))


class MultiLayerPredictor(Predictor):
    """A weighted mix of the distributions at layers ``l, l-1, l-2, ...`` (weights renormalised over those that exist).

    The same guess for every lookahead: recent layers hint at the token's "type", older ones smooth out noise.
    """

    name = "multi_layer"

    def __init__(self, weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1)) -> None:
        self.weights = tuple(weights)

    def mix(self, batch: TraceBatch, layer: int) -> np.ndarray:
        """The mixed distribution at ``layer``: [N, E] float64, rows summing to 1."""
        used = self.weights[: layer + 1]  # layers below 0 do not exist
        mixed_NE = sum(w * batch.probs_NLE[:, layer - i].astype(np.float64) for i, w in enumerate(used))
        return mixed_NE / sum(used)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        targets = target_layers(batch, layer, lookaheads)
        return max_confidence(np.repeat(self.mix(batch, layer)[:, None], len(targets), axis=1))


class PatternPredictor(Predictor):
    """P(top-1 at layer ``l + d`` | top-1 at layer ``l``), counted on train with add-one smoothing.

    Top-1 is slot 0 (the heaviest gate). A token without an expert at ``l`` (dropped) gets the smoothed
    top-1 marginal of layer ``l + d``; ``d = 0`` is the identity.
    """

    name = "pattern"

    def __init__(self, smoothing: float = 1.0) -> None:
        self.smoothing = smoothing
        self.transitions: dict[tuple[int, int], np.ndarray] = {}  # (layer, d) -> [E, E], rows sum to 1
        self.top1_marginal_LE: np.ndarray | None = None

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        top1_NL = train.experts_NLK[:, :, 0]
        num_layers = top1_NL.shape[1]
        self.top1_marginal_LE = expert_marginals(top1_NL[:, :, None], num_experts, self.smoothing)
        self.transitions = {}
        for layer in range(num_layers):
            for d in range(1, num_layers - layer):
                source_N, target_N = top1_NL[:, layer], top1_NL[:, layer + d]
                both = (source_N >= 0) & (target_N >= 0)
                flat = source_N[both] * num_experts + target_N[both]
                counts_EE = np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
                smoothed_EE = counts_EE + self.smoothing
                self.transitions[layer, d] = smoothed_EE / smoothed_EE.sum(-1, keepdims=True)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        if self.top1_marginal_LE is None:
            raise _not_fitted(self.name)
        target_layers(batch, layer, lookaheads)
        num_experts = self.top1_marginal_LE.shape[-1]
        current_N = batch.experts_NLK[:, layer, 0]
        known_N1 = (current_N >= 0)[:, None]
        probs_NDE = np.empty((batch.num_rows, len(lookaheads), num_experts))
        for i, d in enumerate(lookaheads):
            table_EE = np.eye(num_experts) if d == 0 else self.transitions[layer, d]
            probs_NDE[:, i] = np.where(known_N1, table_EE[np.maximum(current_N, 0)], self.top1_marginal_LE[layer + d])
        return max_confidence(probs_NDE)


class AdaptivePredictor(Predictor):
    """Confidence-weighted mix: ``w = c_pattern / (c_pattern + c_multi)``, ``w * pattern + (1 - w) * multi_layer``."""

    name = "adaptive"

    def __init__(self, weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1), smoothing: float = 1.0) -> None:
        self.multi_layer = MultiLayerPredictor(weights)
        self.pattern = PatternPredictor(smoothing)

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        self.pattern.fit(train, num_experts)

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        pattern = self.pattern.predict(batch, layer, lookaheads)
        multi = self.multi_layer.predict(batch, layer, lookaheads)
        c_pattern_ND1 = pattern.confidence_ND[..., None].astype(np.float64)
        c_multi_ND1 = multi.confidence_ND[..., None].astype(np.float64)
        w_ND1 = c_pattern_ND1 / (c_pattern_ND1 + c_multi_ND1)  # max probs are >= 1/E > 0: never 0/0
        return max_confidence(w_ND1 * pattern.probs_NDE + (1 - w_ND1) * multi.probs_NDE)
