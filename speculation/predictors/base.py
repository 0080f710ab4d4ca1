"""The interface every routing predictor implements: heuristics, baselines and (issue #5) learned models.

Shape legend (docs/glossary.md): N token rows (whole sequences, in (seq, pos) order), L MoE layers, K expert slots,
E experts, H hidden width, D lookaheads asked for.

**Causality contract.** Predicting for MoE layer ``l`` of token ``t``, a predictor may read: every field of rows
of *earlier tokens of the same sequence* at any layer, and row ``t`` itself only at layers ``<= l`` (its routing
there, and the hidden state entering layer ``l``'s router). Nothing at layers ``> l`` of row ``t``, and nothing of
later rows. The evaluator's tests perturb exactly that forbidden part and require identical outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speculation.traces.batches import TraceBatch


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

    def lookaheads_at(self, layer: int, num_layers: int, max_lookahead: int) -> list[int]:
        """The lookaheads this predictor is asked at source ``layer``: every d in 1..``max_lookahead`` that it
        reaches (``self.max_lookahead``) and that leaves a target layer (``layer + d < num_layers``).

        The one place that decides it, for the evaluator and the simulator alike.
        """
        reach = min(max_lookahead, self.max_lookahead or max_lookahead)
        return [d for d in range(1, reach + 1) if layer + d < num_layers]

    def reach_fix(self, lookahead: int) -> str:
        """How to make this predictor reach ``lookahead`` (said where its ``max_lookahead`` leaves rows out)."""
        return f"retrain it with predictor.max_lookahead={lookahead}"

    def fit(self, train: TraceBatch, num_experts: int) -> None:
        """Learn statistics from the train split (default: nothing to learn)."""

    def predict(self, batch: TraceBatch, layer: int, lookaheads: Sequence[int]) -> Prediction:
        raise NotImplementedError
