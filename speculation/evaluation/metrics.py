"""Per-token metrics of a routing prediction against the router's real decision, and their aggregation.

Shape legend (docs/glossary.md): N tokens, E experts, K expert slots of the target layer.

Every metric is computed per token, then averaged over the tokens where it is defined (never on batch-averaged
distributions). For a token predicted at lookahead d, the *target* is the router's decision at layer l + d:
its selected set S (experts >= 0; slot 0 is the router's top-1 choice) and its distribution r.

- ``top1_acc``: argmax of the prediction == the router's top-1 choice (tokens whose top-1 slot was dropped by
  capacity are excluded: no expert ran for them).
- ``recall_at_budget``: |S ∩ top-B of prediction| / |S| (B = the prefetch budget); tokens with S empty excluded.
- ``exact_set``: top-|S| of the prediction == S.
- ``f1``: 2|P ∩ S| / (|P| + |S|) with P = the prediction's top-K (K = max experts per token of the trace), so a
  variable-k router is scored on set size too.
- ``kl``: KL(r || prediction) in nats, prediction clipped at 1e-9.
- ``ece``: 15 equal-width confidence bins, sum_b (n_b / n) |accuracy_b - confidence_b| on top-1 correctness.
- ``brier``: mean (confidence - top-1 correct)^2.
- ``conf_corr``: Spearman correlation of confidence and top-1 correctness (confidences grouped to 1e-3).
- ``change_rate``: fraction of tokens (with a predecessor in the same sequence) whose predicted top-1 differs from
  the predecessor's: lower means fewer cache changes.
- *would-be misses* (``speculation.traces.batches.would_be_misses``): tokens whose target top-1 expert was used,
  in any slot, by none of the previous ``window`` tokens of the same sequence at the target layer (a sequence's
  first token always is one): the copies a cache of recently used experts would have to make on demand, so the
  only tokens where a prefetch can save time. ``miss_share`` is their share of the tokens with a top-1;
  ``miss_top1_acc`` and ``miss_recall_at_budget`` are ``top1_acc`` and ``recall_at_budget`` on them alone.
Confidence intervals for top-1 accuracy come from a bootstrap over documents (percentile, 95 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ECE_BINS = 15
RANK_BINS = 1001  # confidence grouped to 1e-3 for the Spearman ranks
PER_TOKEN = ("top1_acc", "recall_at_budget", "exact_set", "f1", "kl", "brier", "change_rate", "miss_share",
             "miss_top1_acc", "miss_recall_at_budget")  # fmt: skip


def token_metrics(
    probs_NE: np.ndarray,
    confidence_N: np.ndarray,
    experts_NK: np.ndarray,
    router_probs_NE: np.ndarray,
    prev_N: np.ndarray,
    budget: int,
    miss_N: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-token values (float64, NaN where undefined) of every per-token metric, plus ``confidence``.

    ``miss_N``: the would-be misses of the target layer (``traces.batches.would_be_misses``); without it the miss
    metrics are undefined (NaN)."""
    num_tokens, num_experts = probs_NE.shape
    order_NE = np.argsort(-probs_NE, axis=1, kind="stable")
    predicted_top1 = order_NE[:, 0]
    selected_NE = np.zeros((num_tokens, num_experts), dtype=bool)
    valid_NK = experts_NK >= 0
    rows, slots = np.nonzero(valid_NK)
    selected_NE[rows, experts_NK[rows, slots]] = True
    set_size = selected_NE.sum(1)
    has_set = set_size > 0
    top1_target = experts_NK[:, 0]
    has_top1 = top1_target >= 0
    correct = np.where(has_top1, predicted_top1 == top1_target, np.nan)

    rank_NE = np.empty_like(order_NE)
    rank_NE[np.arange(num_tokens)[:, None], order_NE] = np.arange(num_experts)[None, :]  # rank of each expert
    hits_budget = (selected_NE & (rank_NE < budget)).sum(1)
    hits_own_size = (selected_NE & (rank_NE < set_size[:, None])).sum(1)
    max_k = experts_NK.shape[1]
    hits_max_k = (selected_NE & (rank_NE < max_k)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(has_set, hits_budget / set_size, np.nan)
        exact = np.where(has_set, (hits_own_size == set_size).astype(float), np.nan)
        f1 = np.where(has_set, 2 * hits_max_k / (min(max_k, num_experts) + set_size), np.nan)
    router = router_probs_NE.astype(np.float64)
    predicted = np.clip(probs_NE.astype(np.float64), 1e-9, None)
    kl = np.where(router > 0, router * (np.log(np.clip(router, 1e-300, None)) - np.log(predicted)), 0.0).sum(1)
    has_prev = prev_N >= 0
    changed = np.where(has_prev, predicted_top1 != predicted_top1[np.where(has_prev, prev_N, 0)], np.nan)
    confidence = confidence_N.astype(np.float64)
    miss = np.zeros(num_tokens, dtype=bool) if miss_N is None else miss_N
    known = has_top1 & (miss_N is not None)
    return {
        "top1_acc": correct,
        "recall_at_budget": recall,
        "exact_set": exact,
        "f1": f1,
        "kl": kl,
        "brier": np.where(has_top1, (confidence - np.nan_to_num(correct)) ** 2, np.nan),
        "change_rate": changed.astype(float),
        "miss_share": np.where(known, miss.astype(float), np.nan),
        "miss_top1_acc": np.where(known & miss, correct, np.nan),
        "miss_recall_at_budget": np.where(known & miss, recall, np.nan),
        "confidence": np.where(has_top1, confidence, np.nan),
    }


@dataclass
class MetricAccumulator:
    """Sums per document (for means and the document bootstrap) and confidence histograms (ECE, Spearman)."""

    num_docs: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [num_docs] sum of defined values
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [num_docs] tokens where defined
    ece_bins: np.ndarray = field(default_factory=lambda: np.zeros((ECE_BINS, 3)))  # count, sum conf, sum correct
    rank_bins: np.ndarray = field(default_factory=lambda: np.zeros((RANK_BINS, 2)))  # count, correct
    tokens: int = 0

    def update(self, values: dict[str, np.ndarray], doc_N: np.ndarray) -> None:
        for name in PER_TOKEN:
            defined = ~np.isnan(values[name])
            if name not in self.sums:
                self.sums[name] = np.zeros(self.num_docs)
                self.counts[name] = np.zeros(self.num_docs)
            self.sums[name] += np.bincount(doc_N[defined], weights=values[name][defined], minlength=self.num_docs)
            self.counts[name] += np.bincount(doc_N[defined], minlength=self.num_docs)
        defined = ~np.isnan(values["top1_acc"])
        confidence, correct = np.clip(values["confidence"][defined], 0.0, 1.0), values["top1_acc"][defined]
        ece_index = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
        for column, weights in enumerate((None, confidence, correct)):
            self.ece_bins[:, column] += np.bincount(ece_index, weights=weights, minlength=ECE_BINS)
        rank_index = np.rint(confidence * (RANK_BINS - 1)).astype(int)
        self.rank_bins[:, 0] += np.bincount(rank_index, minlength=RANK_BINS)
        self.rank_bins[:, 1] += np.bincount(rank_index, weights=correct, minlength=RANK_BINS)
        self.tokens += len(doc_N)

    def merge(self, other: MetricAccumulator) -> None:
        for name in other.sums:
            if name not in self.sums:
                self.sums[name], self.counts[name] = np.zeros(self.num_docs), np.zeros(self.num_docs)
            self.sums[name] += other.sums[name]
            self.counts[name] += other.counts[name]
        self.ece_bins += other.ece_bins
        self.rank_bins += other.rank_bins
        self.tokens += other.tokens

    def mean(self, name: str) -> float:
        count = self.counts[name].sum()
        return float(self.sums[name].sum() / count) if count else float("nan")

    def summary(self, bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
        row = {name: self.mean(name) for name in PER_TOKEN}
        low, high = bootstrap_ci(self.sums["top1_acc"], self.counts["top1_acc"], bootstrap, seed)
        row.update(
            top1_ci_low=low,
            top1_ci_high=high,
            ece=expected_calibration_error(self.ece_bins),
            conf_corr=binned_spearman(self.rank_bins),
            n_tokens=int(self.counts["top1_acc"].sum()),
            n_docs=int((self.counts["top1_acc"] > 0).sum()),
        )
        return row

    def reliability(self) -> dict[str, list[float]]:
        """Per ECE bin: token count, mean confidence and accuracy (NaN for empty bins), for reliability diagrams."""
        count = self.ece_bins[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "count": count.tolist(),
                "confidence": (self.ece_bins[:, 1] / count).tolist(),
                "accuracy": (self.ece_bins[:, 2] / count).tolist(),
            }


def expected_calibration_error(bins: np.ndarray) -> float:
    """ECE from per-bin (count, sum of confidence, sum of correct)."""
    total = bins[:, 0].sum()
    if total == 0:
        return float("nan")
    return float(np.abs(bins[:, 2] - bins[:, 1]).sum() / total)


def binned_spearman(bins: np.ndarray) -> float:
    """Spearman correlation of confidence (grouped into bins, ties averaged) and a 0/1 outcome, from counts."""
    count, ones = bins[:, 0], bins[:, 1]
    total, total_ones = count.sum(), ones.sum()
    zeros = total - total_ones
    if total < 2 or total_ones == 0 or zeros == 0 or (count > 0).sum() < 2:
        return float("nan")  # a constant confidence or outcome has no rank correlation
    rank_x = np.cumsum(count) - count + (count + 1) / 2  # average rank of each bin's tied values
    rank_zero, rank_one = (zeros + 1) / 2, zeros + (total_ones + 1) / 2
    mean_x = mean_y = (total + 1) / 2  # both rank vectors are permutations (with ties) of 1..total
    cov = ((count - ones) * (rank_x - mean_x) * (rank_zero - mean_y)).sum()
    cov += (ones * (rank_x - mean_x) * (rank_one - mean_y)).sum()
    var_x = (count * (rank_x - mean_x) ** 2).sum()
    var_y = zeros * (rank_zero - mean_y) ** 2 + total_ones * (rank_one - mean_y) ** 2
    return float(cov / np.sqrt(var_x * var_y))


def bootstrap_ci(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of sum/count when documents are resampled with replacement."""
    present = counts > 0  # per document
    sums, counts = sums[present], counts[present]
    if len(sums) == 0 or resamples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=resamples)  # [resamples, documents]
    ratios = (weights @ sums) / np.maximum(weights @ counts, 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)
