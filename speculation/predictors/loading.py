"""Build the methods an evaluation or a simulation runs: heuristics and baselines by name, trained predictors from
their run directories.

A trained predictor's directory (``Workdir.run(name)``) holds ``predictor.json`` with at least
``{"type": ..., "name": ..., "traces_fingerprint": ...}``. The fingerprint ties it to the traced model: scoring
a predictor on another model's traces is refused, since its expert ids would mean nothing there.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from speculation.errors import UserError
from speculation.predictors import HEURISTICS
from speculation.predictors.base import Predictor
from speculation.predictors.gate_lookahead import gate_lookahead_for
from speculation.predictors.trained import TrainedPredictor, read_run
from speculation.traces import TraceStore
from speculation.workdir import PREDICTOR_FILE

# Trained predictor types by predictor.json "type": each class provides ``from_dir(path, meta)``.
TRAINED_PREDICTORS: dict[str, type] = {"learned": TrainedPredictor}


def build_heuristics(names: list[str], store: TraceStore, seed: int) -> tuple[list[Predictor], dict[str, str]]:
    """The named heuristics/baselines, and the ones that cannot run on these traces with the reason."""
    methods, skipped = [], {}
    for name in names:
        cls = HEURISTICS[name]
        if name == "gate_lookahead":
            # from the hidden states, or from the scores the trace stored (trace.gate_lookahead)
            predictor, why = gate_lookahead_for(store)
            if predictor is None:
                skipped[name] = why
                continue
            methods.append(predictor)
        elif "seed" in inspect.signature(cls).parameters:
            methods.append(cls(seed=seed))
        else:
            methods.append(cls())
    return methods, skipped


def _hidden_form(projection: dict | None) -> str:
    if projection is None:
        return "as traced"
    return f"projected to width {projection['width']} (seed {projection['seed']})"


def input_problem(run_dir: Path, meta: dict, store: TraceStore) -> str | None:
    """Why a trained predictor cannot read these traces' inputs, or None: it needs every layer's hidden state, in the
    form it was trained on (as traced, or projected by the same ``trace.hidden_projection``)."""
    hidden = store.manifest.hidden
    if hidden.layers != list(range(store.num_layers)):
        return (
            f"predictor {run_dir} reads every MoE layer's hidden state, but {store.root} holds {hidden.describe()}; "
            "evaluate it on traces collected with trace.save_hidden=true trace.hidden_layers=null."
        )
    trained_on = meta["geometry"].get("hidden_projection")  # absent from runs on unprojected traces
    here = None if hidden.projection is None else {"width": hidden.projection.width, "seed": hidden.projection.seed}
    if trained_on != here:
        return (
            f"predictor {run_dir} was trained on hidden states {_hidden_form(trained_on)}, but {store.root} holds them "
            f"{_hidden_form(here)}; evaluate it on traces collected with the same trace.hidden_projection and "
            "trace.projection_seed, or retrain it on these with train.overwrite=true."
        )
    return None


def load_trained_predictors(directory: Path, store: TraceStore) -> tuple[list[Predictor], dict[str, str]]:
    """Every finished run under ``directory`` (``Workdir.predictors``; none if it does not exist), checked against
    the traces, and the unfinished ones with why they are left out.

    A finished run that cannot be scored here (broken files, another model's traces, an unknown type) stops the
    evaluation before any work, with one line per problem named: scoring the others silently would leave a hole
    in the comparison.
    """
    if not directory.is_dir():
        return [], {}
    predictors, skipped, problems = [], {}, []
    fingerprint = store.manifest.fingerprint()
    for run_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        if not (run_dir / PREDICTOR_FILE).is_file():
            skipped[run_dir.name] = (
                f"unfinished (still training, or stopped before it wrote {PREDICTOR_FILE}); run its spec-train "
                "command again to finish it"
            )
            continue
        try:
            meta = read_run(run_dir)
            if meta["traces_fingerprint"] != fingerprint:
                raise UserError(
                    f"predictor {run_dir} was trained on traces of another model ({meta.get('model', 'unknown')}: "
                    f"other weights, tokenizer or geometry) than {store.root} ({store.manifest.model_name}); "
                    "evaluate it in its own workdir, or retrain it on these traces with train.overwrite=true."
                )
            if problem := input_problem(run_dir, meta, store):
                raise UserError(problem)
            if meta["type"] not in TRAINED_PREDICTORS:
                raise UserError(
                    f"predictor {run_dir} has type {meta['type']!r}, which this version cannot load; known types: "
                    f"{sorted(TRAINED_PREDICTORS)}."
                )
            predictors.append(TRAINED_PREDICTORS[meta["type"]].from_dir(run_dir, meta))
        except UserError as err:
            problems.append(str(err))
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return predictors, skipped
