"""Every metric on tiny hand-made predictions, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from speculation.evaluation.metrics import (
    PER_TOKEN,
    RANK_BINS,
    MetricAccumulator,
    binned_spearman,
    bootstrap_ci,
    expected_calibration_error,
    token_metrics,
)
from speculation.traces.batches import would_be_misses

# 4 tokens, E = 4, K = 2 (a variable-k router): selected sets {1, 2}, {3}, dropped, {0}.
PROBS = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.6, 0.3, 0.05, 0.05]])
EXPERTS = np.array([[1, 2], [3, -1], [-1, -1], [0, -1]])
ROUTER = np.array([[0.1, 0.5, 0.3, 0.1], [0.5, 0.5, 0.0, 0.0], [0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
PREV = np.array([-1, 0, 1, 2])


@pytest.fixture
def values():
    return token_metrics(PROBS, PROBS.max(1), EXPERTS, ROUTER, PREV, budget=2)


def test_top1_recall_exact_set(values):
    np.testing.assert_array_equal(values["top1_acc"], [1, 0, np.nan, 1])  # the dropped token has no target
    np.testing.assert_array_equal(values["recall_at_budget"], [1, 0, np.nan, 1])  # {3} not in top-2 {0, 1}
    np.testing.assert_array_equal(values["exact_set"], [1, 0, np.nan, 1])


def test_variable_k_f1(values):
    # P = top-K (K = 2) of the prediction. Token 3: P = {0, 1}, S = {0}: F1 = 2*1 / (2 + 1).
    np.testing.assert_allclose(values["f1"], [1.0, 0.0, np.nan, 2 / 3])


def test_kl_router_to_prediction(values):
    expected_t1 = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.3)  # zero-probability terms contribute 0
    expected_t3 = math.log(1 / 0.6)
    np.testing.assert_allclose(values["kl"], [0.0, expected_t1, 0.0, expected_t3], atol=1e-12)


def test_brier_and_change_rate(values):
    np.testing.assert_allclose(values["brier"], [0.25, 0.16, np.nan, 0.16])
    # predicted top-1: 1, 0, 0 (ties break to the lowest id), 0 -> changes at token 1 only; token 0 has no predecessor
    np.testing.assert_array_equal(values["change_rate"], [np.nan, 1, 0, 0])


def test_expected_calibration_error_by_hand():
    # conf 0.95 (bin 14): accuracy 1/2; conf 0.55 (bin 8): accuracy 2/2 -> ECE = 0.5 * 0.45 + 0.5 * 0.45.
    accumulator = MetricAccumulator(num_docs=1)
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    nan = np.full(4, np.nan)
    per_token = dict.fromkeys([name for name in PER_TOKEN if name != "top1_acc"], nan)
    accumulator.update({"top1_acc": correct, "confidence": confidence, **per_token}, np.zeros(4, dtype=int))
    assert accumulator.summary(bootstrap=0)["ece"] == pytest.approx(0.45)
    assert math.isnan(expected_calibration_error(np.zeros((15, 3))))  # no tokens: undefined
    reliability = accumulator.reliability()
    assert reliability["count"][14] == 2 and reliability["accuracy"][14] == 0.5 and reliability["confidence"][8] == 0.55


def test_means_are_per_token_over_defined_tokens(values):
    accumulator = MetricAccumulator(num_docs=2)
    accumulator.update(values, np.array([0, 0, 1, 1]))
    summary = accumulator.summary(bootstrap=0)
    assert summary["top1_acc"] == pytest.approx(2 / 3)  # 3 tokens with a target, 2 right
    assert summary["n_tokens"] == 3 and summary["n_docs"] == 2
    assert summary["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_spearman_from_bins_equals_scipy():
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(4000), 3)
    correct = (rng.random(4000) < confidence).astype(float)
    bins = np.zeros((RANK_BINS, 2))
    index = np.rint(confidence * (RANK_BINS - 1)).astype(int)
    bins[:, 0] = np.bincount(index, minlength=RANK_BINS)
    bins[:, 1] = np.bincount(index, weights=correct, minlength=RANK_BINS)
    assert binned_spearman(bins) == pytest.approx(spearmanr(confidence, correct).statistic, abs=1e-12)
    constant = np.zeros((RANK_BINS, 2))
    constant[500] = [10, 5]
    assert math.isnan(binned_spearman(constant))  # constant confidence: undefined, not 0


def test_bootstrap_over_documents():
    # Every document has accuracy 0.5: any resample gives 0.5.
    low, high = bootstrap_ci(np.array([1.0, 2.0, 5.0]), np.array([2.0, 4.0, 10.0]), 200, seed=0)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    # Two documents at 0 and 1 with equal weight: the interval spans most of [0, 1] and contains the mean.
    low, high = bootstrap_ci(np.array([0.0, 10.0]), np.array([10.0, 10.0]), 2000, seed=0)
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([3.0]), np.array([0.0]), 100, 0))  # no tokens


def test_would_be_misses_by_hand():
    # One layer, K = 2 (slot 1 unused): sequence A routes 0, 1, 0, 2, 1; sequence B starts at row 5 and routes 1.
    experts = np.array([[0, -1], [1, -1], [0, -1], [2, -1], [1, -1], [1, -1]])
    prev = np.array([-1, 0, 1, 2, 3, -1])
    # window 2, row 4: rows 3 and 2 used {2, 0}, so 1 misses; window 3 adds row 1 (expert 1): a hit.
    np.testing.assert_array_equal(would_be_misses(experts, prev, 2), [True, True, False, True, True, True])
    np.testing.assert_array_equal(would_be_misses(experts, prev, 3), [True, True, False, True, False, True])
    np.testing.assert_array_equal(would_be_misses(experts, prev, 1), [True, True, True, True, True, True])
    second_slot = experts.copy()
    second_slot[3, 1] = 1  # row 3 also used expert 1 (in its second slot): row 4 is a hit even with window 1
    assert not would_be_misses(second_slot, prev, 1)[4]


def test_miss_metrics_score_the_would_be_misses_alone():
    miss = np.array([True, False, True, False])  # token 2 has no top-1 (dropped): never scored
    values = token_metrics(PROBS, PROBS.max(1), EXPERTS, ROUTER, PREV, budget=2, miss_N=miss)
    np.testing.assert_array_equal(values["miss_share"], [1, 0, np.nan, 0])
    np.testing.assert_array_equal(values["miss_top1_acc"], [1, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(values["miss_recall_at_budget"], [1, np.nan, np.nan, np.nan])
    without = token_metrics(PROBS, PROBS.max(1), EXPERTS, ROUTER, PREV, budget=2)
    assert np.isnan(without["miss_share"]).all() and np.isnan(without["miss_top1_acc"]).all()
