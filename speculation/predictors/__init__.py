"""Routing predictors: the interface, the heuristic and baseline rows of every table, and learned models.

``HEURISTICS`` maps each baseline's metrics name to its class, in table order (the names are
``speculation.config.evaluate.HEURISTIC_METHODS``). All construct with defaults except ``gate_lookahead``, which
needs the routers' weights (``GateLookaheadPredictor.from_store(store)``) or the scores a compact trace stored
(``StoredGateLookaheadPredictor``; ``gate_lookahead_for`` picks); :mod:`speculation.predictors.loading` builds
them by name and loads trained predictors from their run directories.
"""

from speculation.config.evaluate import HEURISTIC_METHODS
from speculation.predictors.base import Prediction, Predictor
from speculation.predictors.gate_lookahead import GateLookaheadPredictor, StoredGateLookaheadPredictor
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
from speculation.traces.batches import TraceBatch  # what every predictor reads

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
assert list(HEURISTICS) == HEURISTIC_METHODS, f"heuristic names {list(HEURISTICS)} != {HEURISTIC_METHODS}"

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
    "StoredGateLookaheadPredictor",
    "TraceBatch",
]
