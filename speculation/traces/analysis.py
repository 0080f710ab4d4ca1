"""What there is to predict in a trace split, as DataFrames: the model's facts, router health per layer, how much
layer l's expert tells about layer l + 1's, router entropy, and temporal locality (what a cache gets for free).

Shape legend (docs/glossary.md): N token rows, L MoE layers, K expert slots, E experts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from speculation.config.model import RouterConfig
from speculation.health import RouterHealth
from speculation.traces.batches import router_distribution
from speculation.traces.reader import TraceStore
from speculation.workdir import CONFIG_FILE


def router_label(store: TraceStore) -> str:
    """The traced router's :attr:`RouterConfig.label` (the embedded model's, from its saved config); ``hf`` for a
    checkpoint, whose router is the model's own."""
    model = store.manifest.raw.get("model") or {}
    config_path = store.root / str(model.get("source_dir", "")) / CONFIG_FILE
    if model.get("kind") != "embedded" or not config_path.is_file():
        return "hf"
    return RouterConfig.from_json(json.loads(config_path.read_text())["router"]).label


IDENTITY_COLUMNS = ["model", "router", "corpus", "corpus_fingerprint", "corpus_documents", "traces_fingerprint"]


def trace_identity(store: TraceStore) -> dict[str, Any]:
    """What the traces are, as the identity columns of metrics.csv, simulation.csv and spec-compare: the model,
    the router label, the corpus (kind, fingerprint prefix, documents) and the traces' own fingerprint prefix."""
    corpus = store.manifest.raw.get("corpus") or {}
    return {
        "model": store.manifest.model_name,
        "router": router_label(store),
        "corpus": corpus.get("kind"),
        "corpus_fingerprint": (corpus.get("fingerprint") or "")[:16],
        "corpus_documents": corpus.get("documents"),
        "traces_fingerprint": store.manifest.fingerprint()[:16],
    }


def model_facts(store: TraceStore) -> pd.Series:
    """The traced model: family, geometry and routing, one value per fact."""
    manifest, geometry = store.manifest, store.manifest.geometry
    return pd.Series(
        {
            "model": manifest.model_name,
            "family": manifest.adapter,
            **{key: geometry.get(key) for key in ("num_layers", "moe_layers", "d_model", "d_ff", "vocab_size")},
            "num_experts (E)": store.num_experts,
            "experts per token (K)": store.max_experts_per_token,
            "router layers": ", ".join(store.layer_names),
            "routing score": manifest.routing.score,
            "bytes_per_expert": geometry.get("bytes_per_expert"),
            "hidden layers saved": manifest.hidden.layers,
        },
        name="value",
    )


def splits_table(store: TraceStore) -> pd.DataFrame:
    """Rows and shards per traced split."""
    return pd.DataFrame(
        {name: {"rows": entry["rows"], "shards": len(entry["shards"])} for name, entry in store.manifest.splits.items()}
    ).T.rename_axis("split")


def split_health(store: TraceStore, split: str) -> RouterHealth:
    """Router health of one split, counted from its stored routing (the accumulator ``spec-collect`` uses)."""
    health = RouterHealth(store.layer_names, store.num_experts)
    for shard in store.split(split).iter_shards():
        health.update(shard["experts"], shard["logits"], shard.get("dropped"))
    return health


def health_table(health: RouterHealth) -> pd.DataFrame:
    """Per layer: load-balance score, utilisation, largest expert load, overflow, normalised entropy, z-loss."""
    layers = health.summary()["layers"]
    table = pd.DataFrame(layers).T.rename_axis("layer")
    table["max_load"] = [max(layer["expert_load"]) for layer in layers.values()]
    columns = ["load_balance_score", "utilisation", "max_load", "capacity_overflow_pct", "gate_entropy_normalised",
               "z_loss"]  # fmt: skip
    return table[columns].astype(float)


def top1(store: TraceStore, split: str) -> np.ndarray:
    """The router's first choice [N, L] (-1: dropped)."""
    return store.split(split).array("experts")[:, :, 0].astype(np.int64)


def transition_counts(top1_NL: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """[E, E] counts of (top-1 at ``layer``, top-1 at ``layer + 1``) over tokens kept at both."""
    current, following = top1_NL[:, layer], top1_NL[:, layer + 1]
    both = (current >= 0) & (following >= 0)
    flat = current[both] * num_experts + following[both]
    return np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def transition_probs(store: TraceStore, split: str) -> list[np.ndarray]:
    """P(top-1 at layer l + 1 | top-1 at layer l), one [E, E] matrix per layer pair (rows sum to 1 or 0)."""
    counts = [transition_counts(top1(store, split), layer, store.num_experts) for layer in range(store.num_layers - 1)]
    return [c / np.clip(c.sum(axis=1, keepdims=True), 1, None) for c in counts]


def _accuracy(counts_EE: np.ndarray, rule_E: np.ndarray) -> float:
    """Accuracy on ``counts_EE`` of predicting next = rule_E[current]."""
    return float(counts_EE[np.arange(len(rule_E)), rule_E].sum() / max(counts_EE.sum(), 1))


def transition_table(store: TraceStore, split: str, fit_split: str = "train") -> pd.DataFrame:
    """Per layer pair, accuracy of predicting the next layer's top-1 by the frequency prior and by the most likely
    next expert given the current one, both fitted on ``fit_split`` (honest held-out baselines), the same rule
    fitted on ``split`` itself (an optimistic bound for a lookup table), the same-id rate and chance."""
    fit = fit_split if fit_split in store.splits else split
    scored, fitted, num_experts, names = top1(store, split), top1(store, fit), store.num_experts, store.layer_names
    rows = []
    for layer in range(store.num_layers - 1):
        counts = transition_counts(scored, layer, num_experts)
        fit_counts = transition_counts(fitted, layer, num_experts)
        rows.append(
            {
                "pair": f"{names[layer]} → {names[layer + 1]}",
                "tokens": int(counts.sum()),
                "prior_acc": _accuracy(counts, np.full(num_experts, fit_counts.sum(axis=0).argmax())),
                "conditional_acc": _accuracy(counts, fit_counts.argmax(axis=1)),
                "conditional_acc_in_sample": _accuracy(counts, counts.argmax(axis=1)),
                "same_id": _accuracy(counts, np.arange(num_experts)),
                "chance": 1 / num_experts,
            }
        )
    table = pd.DataFrame(rows).set_index("pair")
    table["gain_over_prior"] = table["conditional_acc"] - table["prior_acc"]
    return table


def normalised_entropy(store: TraceStore, split: str) -> np.ndarray:
    """Per token and layer, the entropy of the router's distribution over ln E: [N, L] (0 sure, 1 uniform)."""
    probs_NLE = router_distribution(store.split(split).array("logits"), store.manifest.routing.score)
    return -(probs_NLE * np.log(np.clip(probs_NLE, 1e-12, None))).sum(-1) / np.log(store.num_experts)


def entropy_table(store: TraceStore, split: str) -> pd.DataFrame:
    """Per layer: mean, 10th percentile, median and 90th percentile of the normalised router entropy."""
    entropy_NL = normalised_entropy(store, split)
    return pd.DataFrame(
        {
            "mean": entropy_NL.mean(axis=0),
            "p10": np.percentile(entropy_NL, 10, axis=0),
            "median": np.median(entropy_NL, axis=0),
            "p90": np.percentile(entropy_NL, 90, axis=0),
        },
        index=pd.Index(store.layer_names, name="layer"),
    )


def temporal_table(store: TraceStore, split: str) -> pd.DataFrame:
    """Per layer: how often a token's top-1 repeats the previous token's in the same sequence, against chance
    Σ f_i² (two independent draws from that layer's top-1 load f): what an LRU cache keeps for free."""
    top1_NL, seq_N = top1(store, split), store.split(split).array("seq")
    same_seq = seq_N[1:] == seq_N[:-1]
    current, previous = top1_NL[1:][same_seq], top1_NL[:-1][same_seq]
    kept = (current >= 0) & (previous >= 0)
    repeat = ((current == previous) & kept).sum(axis=0) / np.clip(kept.sum(axis=0), 1, None)
    load_LE = np.stack([np.bincount(top1_NL[top1_NL[:, i] >= 0, i], minlength=store.num_experts)
                        for i in range(store.num_layers)]).astype(float)  # fmt: skip
    load_LE /= np.clip(load_LE.sum(axis=1, keepdims=True), 1, None)
    table = pd.DataFrame(
        {"repeat_rate": repeat, "chance": np.square(load_LE).sum(axis=1), "token_pairs": kept.sum(axis=0)},
        index=pd.Index(store.layer_names, name="layer"),
    )
    table["ratio_to_chance"] = table["repeat_rate"] / table["chance"]
    return table
