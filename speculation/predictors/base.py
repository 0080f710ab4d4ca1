"""The interface every routing predictor implements: heuristics, baselines and (issue #5) learned models.

Shape legend: N token rows (whole sequences, in (seq, pos) order), L MoE layers, K expert slots, E experts,
H hidden width, D lookaheads asked for.

**Causality contract.** Predicting for MoE layer ``l`` of token ``t``, a predictor may read: every field of rows
of *earlier tokens of the same sequence* at any layer, and row ``t`` itself only at layers ``<= l`` (its routing
there, and the hidden state entering layer ``l``'s router). Nothing at layers ``> l`` of row ``t``, and nothing of
later rows. The evaluator's tests perturb exactly that forbidden part and require identical outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TraceBatch:
    """A block of whole traced sequences, as float32/int64 numpy arrays."""

    experts_NLK: np.ndarray  # int64, -1 = dropped/unused slot
    gates_NLK: np.ndarray  # float32
    logits_NLE: np.ndarray  # float32, the router's scores
    probs_NLE: np.ndarray  # float32, the router's distribution (softmax, or normalised sigmoid scores)
    hidden_NLH: np.ndarray | None  # float32 router inputs of the layers in hidden_layers, else None
    hidden_layers: list[int]  # which MoE layers hidden_NLH holds, in order
    seq_N: np.ndarray  # int64 traced-sequence id
    pos_N: np.ndarray  # int64 position in the document
    doc_N: np.ndarray  # int64 document index
    prev_N: np.ndarray  # int64 row index (within this batch) of the previous token of the same sequence, or -1

    @property
    def num_rows(self) -> int:
        return self.experts_NLK.shape[0]

    def hidden_at(self, layer: int) -> np.ndarray | None:
        """The hidden state entering ``layer``'s router [N, H], if it was traced."""
        if self.hidden_NLH is None or layer not in self.hidden_layers:
            return None
        return self.hidden_NLH[:, self.hidden_layers.index(layer)]


@dataclass
class Prediction:
    """Distributions over layer ``l + d``'s experts, one per requested lookahead ``d``."""

    probs_NDE: np.ndarray  # float32, each row sums to 1
    confidence_ND: np.ndarray  # float32 in [0, 1]: the predictor's belief that its top-1 is right


class Predictor:
    """Base class: ``fit`` on the train split (optional), then ``predict`` causally.

    Subclasses set ``name`` (the method name in metrics.csv) and implement :meth:`predict`.
    """

    name: str = ""
    max_lookahead: int | None = None  # the farthest lookahead it predicts; None: any

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        """Learn statistics from the train split (default: nothing to learn)."""

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        raise NotImplementedError
