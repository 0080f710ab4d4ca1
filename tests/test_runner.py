"""The evaluator (``speculation.evaluation.runner``) on synthetic traces with known answers: the oracle scores 1,
random 1/E, every (source layer, lookahead) pair with a target is scored, and a bad split is one clear error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import E, write_store

from speculation.evaluation.runner import evaluate_predictors
from speculation.predictors import OraclePredictor, RandomPredictor
from speculation.traces import SplitWriter, TraceStore, write_manifest


def test_oracle_scores_one_and_random_scores_one_over_e(tmp_path):
    store = write_store(tmp_path, None, num_tokens=30_000)
    result = evaluate_predictors(store, [OraclePredictor(), RandomPredictor(seed=0)], max_lookahead=2, bootstrap=50)
    rows = pd.DataFrame(result.rows)
    pooled = rows[rows["pooled"]].set_index(["method", "lookahead"])
    for d in (1, 2):
        oracle = pooled.loc[("oracle", d)]
        assert oracle["top1_acc"] == 1.0 and oracle["recall_at_budget"] == 1.0 and oracle["exact_set"] == 1.0
        # KL is 0 except where float16 logits tie and the stored argmax is not the router's float32 choice.
        assert oracle["kl"] < 0.01 and oracle["ece"] == 0.0
        assert pooled.loc[("random", d), "top1_acc"] == pytest.approx(1 / E, abs=0.01)
        assert pooled.loc[("random", d), "recall_at_budget"] == pytest.approx(2 / E, abs=0.015)
    assert len(rows[~rows["pooled"]]) == 2 * (3 + 2)  # (l, d) pairs with l + d < L, per method
    assert result.tokens == 30_000


def test_a_predictor_is_asked_only_the_lookaheads_it_reaches(tmp_path):
    store = write_store(tmp_path, None, num_tokens=500)
    short = OraclePredictor()
    short.name, short.max_lookahead = "short_oracle", 1
    rows = pd.DataFrame(evaluate_predictors(store, [short], max_lookahead=3, bootstrap=0).rows)
    assert sorted(rows["lookahead"].unique()) == [1]
    assert short.lookaheads_at(0, 4, 3) == [1] and OraclePredictor().lookaheads_at(2, 4, 3) == [1]


def test_a_split_that_was_not_traced_or_is_empty_is_one_clear_error(tmp_path):
    store = write_store(tmp_path, None, num_tokens=500)
    with pytest.raises(ValueError, match=r"eval.split='val' is not in"):
        evaluate_predictors(store, [OraclePredictor()], split="val")
    writer = SplitWriter(tmp_path, "val")
    empty = {name: values[:0] for name, values in store.split("test").rows(np.arange(1)).items()}
    writer.write_shard(0, empty)
    write_manifest(tmp_path, dict(store.manifest.raw, splits={**store.manifest.splits, "val": writer.finalize(1)}))
    with pytest.raises(ValueError, match=r"split 'val' in .* has no tokens"):
        evaluate_predictors(TraceStore.open(tmp_path), [OraclePredictor()], split="val")
