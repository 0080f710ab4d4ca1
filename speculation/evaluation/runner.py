"""Score predictors on a trace split: every (method, lookahead d, source layer l), plus the ``all`` aggregate.

The prediction made at MoE layer ``l`` for lookahead ``d`` is scored against the router's real decision at layer
``l + d`` of the same token. Only layers with a target exist (``l + d < L``). Rows of metrics.csv are keyed by
``method, lookahead, layer`` where ``layer`` is the source layer ``l`` (``all`` pools every source layer's tokens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from speculation.errors import UserError
from speculation.evaluation.metrics import MetricAccumulator, token_metrics
from speculation.predictors.base import Predictor
from speculation.traces import TraceStore
from speculation.traces.batches import iter_batches, load_batch, would_be_misses


@dataclass
class EvaluationResult:
    rows: list[dict]  # one per (method, lookahead, source layer) and per (method, lookahead) pooled over layers
    reliability: dict[str, dict]  # "<method>/d<d>" -> per-bin count, confidence, accuracy (pooled rows)
    tokens: int  # evaluated tokens (rows of the split)
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it was not evaluated


def check_split(store: TraceStore, split: str) -> None:
    """One clear error for a split that was not traced or holds no tokens."""
    if split not in store.splits:
        raise UserError(f"eval.split={split!r} is not in {store.root}; traced splits: {store.splits}.")
    if store.split(split).num_rows == 0:
        raise UserError(f"split {split!r} in {store.root} has no tokens; trace more documents or pick another split.")


def evaluate_predictors(
    store: TraceStore,
    predictors: Sequence[Predictor],
    split: str = "test",
    max_lookahead: int = 3,
    budget: int = 2,
    block_rows: int = 65536,
    bootstrap: int = 1000,
    seed: int = 0,
    max_tokens: int | None = None,
    miss_window: int = 4,
) -> EvaluationResult:
    """Fit every predictor on the train split, then score it causally on ``split``.

    The config's rules against the traces (``speculation.config.rules``) were checked by the caller, at start.
    """
    check_split(store, split)
    if "train" in store.splits:
        train_batch = load_batch(store, "train", slice(0, store.split("train").num_rows), hidden=False)
        for predictor in predictors:
            predictor.fit(train_batch, store.num_experts)
    target = store.split(split)
    num_docs = int(target.array("doc").max()) + 1
    num_layers = store.num_layers
    accumulators: dict[tuple[str, int, int], MetricAccumulator] = {}
    started, tokens = time.perf_counter(), 0
    progress = tqdm(total=target.num_rows, desc=f"evaluate {split}", unit="tok")
    for batch in iter_batches(store, split, block_rows):
        if max_tokens is not None and tokens >= max_tokens:
            break
        # Per target layer (l + d >= 1), shared by every method and lookahead that targets it.
        misses = {t: would_be_misses(batch.experts_NLK[:, t], batch.prev_N, miss_window) for t in range(1, num_layers)}
        for layer in range(num_layers - 1):
            for predictor in predictors:
                asked = predictor.lookaheads_at(layer, num_layers, max_lookahead)
                if not asked:
                    continue
                prediction = predictor.predict(batch, layer, asked)
                for j, d in enumerate(asked):
                    values = token_metrics(
                        prediction.probs_NDE[:, j],
                        prediction.confidence_ND[:, j],
                        batch.experts_NLK[:, layer + d],
                        batch.probs_NLE[:, layer + d],
                        batch.prev_N,
                        budget,
                        misses[layer + d],
                    )
                    key = (predictor.name, d, layer)
                    accumulators.setdefault(key, MetricAccumulator(num_docs)).update(values, batch.doc_N)
        tokens += batch.num_rows
        progress.update(batch.num_rows)
    progress.close()
    seconds = time.perf_counter() - started
    return EvaluationResult(
        rows=_rows(accumulators, store, bootstrap, seed),
        reliability=_reliability(accumulators),
        tokens=tokens,
        seconds=seconds,
    )


def _pooled(accumulators: dict) -> dict[tuple[str, int], MetricAccumulator]:
    pooled: dict[tuple[str, int], MetricAccumulator] = {}
    for (method, d, _), accumulator in accumulators.items():
        if (method, d) not in pooled:
            pooled[(method, d)] = MetricAccumulator(accumulator.num_docs)
        pooled[(method, d)].merge(accumulator)
    return pooled


def _rows(accumulators: dict, store: TraceStore, bootstrap: int, seed: int) -> list[dict]:
    rows = []
    for (method, d, layer), accumulator in accumulators.items():
        rows.append(
            {"method": method, "lookahead": d, "pooled": False, "layer": layer,
             "source_layer": store.layer_names[layer], "target_layer": store.layer_names[layer + d],
             **accumulator.summary(bootstrap, seed)}
        )  # fmt: skip
    for (method, d), accumulator in _pooled(accumulators).items():
        rows.append(
            {"method": method, "lookahead": d, "pooled": True, "layer": None, "source_layer": None,
             "target_layer": None, **accumulator.summary(bootstrap, seed)}
        )  # fmt: skip
    return rows


def _reliability(accumulators: dict) -> dict[str, dict]:
    return {f"{method}/d{d}": acc.reliability() for (method, d), acc in _pooled(accumulators).items()}
