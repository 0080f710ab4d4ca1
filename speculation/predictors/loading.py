"""Build the methods an evaluation or a simulation runs: heuristics and baselines by name, trained predictors from
their run directories.

A trained predictor's directory (``Workdir.run(name)``) holds ``predictor.json`` with at least
``{"type": ..., "name": ..., "traces_fingerprint": ...}``. The fingerprint ties it to the traced model: scoring
a predictor on another model's traces is refused, since its expert ids would mean nothing there.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from speculation.predictors import HEURISTICS
from speculation.predictors.base import Predictor
from speculation.predictors.trained import TrainedPredictor
from speculation.traces import TraceStore
from speculation.workdir import PREDICTOR_FILE

# Trained predictor types by predictor.json "type": each class provides ``from_dir(path, store)``.
TRAINED_PREDICTORS: dict[str, type] = {"learned": TrainedPredictor}


def build_heuristics(names: list[str], store: TraceStore, seed: int) -> tuple[list[Predictor], dict[str, str]]:
    """The named heuristics/baselines, and the ones that cannot run on these traces with the reason."""
    methods, skipped = [], {}
    for name in names:
        cls = HEURISTICS[name]
        if name == "gate_lookahead":
            missing = store.manifest.missing_hidden(range(store.num_layers - 1))
            if missing:
                skipped[name] = (
                    f"the hidden states of MoE layers {missing} were not traced; re-collect with "
                    "trace.save_hidden=true and trace.hidden_layers=null to score it"
                )
                continue
            methods.append(cls.from_store(store))
        elif "seed" in inspect.signature(cls).parameters:
            methods.append(cls(seed=seed))
        else:
            methods.append(cls())
    return methods, skipped


def load_trained_predictors(directory: Path, store: TraceStore) -> list[Predictor]:
    """Every trained predictor under ``directory`` (``Workdir.predictors``; none if it does not exist), checked
    against the traces."""
    if not directory.is_dir():
        return []
    predictors = []
    fingerprint = store.manifest.fingerprint()
    for run_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        meta_path = run_dir / PREDICTOR_FILE
        if not meta_path.is_file():
            continue  # a run still training (or killed) has no predictor.json yet
        meta = json.loads(meta_path.read_text())
        if meta.get("traces_fingerprint") != fingerprint:
            raise ValueError(
                f"predictor {run_dir} was trained on traces of another model ({meta.get('model', 'unknown')}) than "
                f"{store.root} ({store.manifest.model_name}); evaluate it in its own workdir, or retrain it on these "
                "traces."
            )
        kind = meta.get("type")
        if kind not in TRAINED_PREDICTORS:
            raise ValueError(
                f"predictor {run_dir} has type {kind!r}, which this version cannot load; known types: "
                f"{sorted(TRAINED_PREDICTORS) or 'none yet'}."
            )
        predictors.append(TRAINED_PREDICTORS[kind].from_dir(run_dir, store))
    return predictors
