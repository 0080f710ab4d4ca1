"""Routing predictors: the interface, heuristic and baseline rows of every table, and (issue #5) learned models.

``HEURISTICS`` maps each baseline's metrics name to its class. All construct with defaults except
``gate_lookahead``, which needs the routers' weights: ``GateLookaheadPredictor.from_store(store)``.
"""

from speculation.predictors.base import Prediction, Predictor, TraceBatch
from speculation.predictors.gate_lookahead import GateLookaheadPredictor
from speculation.predictors.heuristics import (
    AdaptivePredictor,
    FrequencyPredictor,
    LayerMinus1Predictor,
    MultiLayerPredictor,
    OraclePredictor,
    PatternPredictor,
    PreviousTokenPredictor,
    RandomPredictor,
)

HEURISTICS: dict[str, type[Predictor]] = {
    cls.name: cls
    for cls in (
        RandomPredictor,
        FrequencyPredictor,
        PreviousTokenPredictor,
        LayerMinus1Predictor,
        MultiLayerPredictor,
        PatternPredictor,
        AdaptivePredictor,
        GateLookaheadPredictor,
        OraclePredictor,
    )
}

__all__ = [
    "HEURISTICS",
    "AdaptivePredictor",
    "FrequencyPredictor",
    "GateLookaheadPredictor",
    "LayerMinus1Predictor",
    "MultiLayerPredictor",
    "OraclePredictor",
    "PatternPredictor",
    "Prediction",
    "Predictor",
    "PreviousTokenPredictor",
    "RandomPredictor",
    "TraceBatch",
]
