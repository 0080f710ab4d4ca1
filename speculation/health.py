"""Router health per MoE layer, computed from recorded routing (any model family, resumable).

Shape legend (docs/glossary.md): N tokens, L MoE layers, K expert slots per token, E experts.

Definitions (per layer, over real tokens):
- ``expert_load``: fraction of kept (token, expert) assignments that went to each expert, f_i.
- ``utilisation``: fraction of experts that received at least one token.
- ``capacity_overflow_pct``: 100 * dropped slots / slots the router chose (kept + dropped).
- ``gate_entropy``: mean entropy (nats) of the router's softmax; ``gate_entropy_normalised`` divides by ln E.
- ``load_variance``: Var_i(E * f_i): 0 when balanced, E - 1 when one expert takes everything.
- ``load_balance_score``: 1 / (E * sum_i f_i^2), the effective number of experts over E: 1 balanced, 1/E collapsed.
- ``z_loss``: mean logsumexp(logits)^2 (ST-MoE eq. 5).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax


class RouterHealth:
    """Accumulates health statistics over shards of routing; :meth:`summary` gives per-layer numbers."""

    def __init__(self, layer_labels: list[str], num_experts: int) -> None:
        num_layers = len(layer_labels)
        self.layer_labels = layer_labels
        self.num_experts = num_experts
        self.assignments_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.dropped_L = np.zeros(num_layers, dtype=np.int64)
        self.entropy_sum_L = np.zeros(num_layers, dtype=np.float64)
        self.z_sum_L = np.zeros(num_layers, dtype=np.float64)
        self.tokens = 0

    def update(self, experts_NLK: np.ndarray, logits_NLE: np.ndarray, dropped_NLK: np.ndarray | None = None) -> None:
        """Add a block of tokens' routing (experts -1 = not computed; ``dropped`` marks capacity drops)."""
        num_layers = experts_NLK.shape[1]
        for layer in range(num_layers):
            chosen = experts_NLK[:, layer].reshape(-1)
            self.assignments_LE[layer] += np.bincount(chosen[chosen >= 0], minlength=self.num_experts)
        if dropped_NLK is not None:
            self.dropped_L += dropped_NLK.sum(axis=(0, 2))
        logits = logits_NLE.astype(np.float64)
        probs = softmax(logits, axis=-1)
        self.entropy_sum_L += -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1).sum(0)
        self.z_sum_L += (logsumexp(logits, axis=-1) ** 2).sum(0)
        self.tokens += experts_NLK.shape[0]

    def merge(self, other: RouterHealth) -> None:
        """Add another accumulator's counts (e.g. one split's) into this one."""
        self.assignments_LE += other.assignments_LE
        self.dropped_L += other.dropped_L
        self.entropy_sum_L += other.entropy_sum_L
        self.z_sum_L += other.z_sum_L
        self.tokens += other.tokens

    def summary(self) -> dict:
        """``{"layers": {label: {...}}, "mean": {...}}`` with the metrics of the module docstring."""
        num_experts = self.num_experts
        layers = {}
        for index, label in enumerate(self.layer_labels):
            assigned = self.assignments_LE[index]
            kept = int(assigned.sum())
            load = assigned / max(kept, 1)
            chosen = kept + int(self.dropped_L[index])
            layers[label] = {
                "tokens": self.tokens,
                "expert_load": load.tolist(),
                "utilisation": float((assigned > 0).mean()),
                "capacity_overflow_pct": 100.0 * float(self.dropped_L[index]) / max(chosen, 1),
                "gate_entropy": float(self.entropy_sum_L[index] / max(self.tokens, 1)),
                "gate_entropy_normalised": float(self.entropy_sum_L[index] / max(self.tokens, 1) / np.log(num_experts))
                if num_experts > 1
                else 0.0,
                "load_variance": float(np.var(num_experts * load)),
                "load_balance_score": float(1.0 / (num_experts * np.square(load).sum())) if kept else 0.0,
                "z_loss": float(self.z_sum_L[index] / max(self.tokens, 1)),
            }
        scalar_keys = [k for k, v in next(iter(layers.values())).items() if k != "expert_load" and k != "tokens"]
        mean = {key: float(np.mean([layer[key] for layer in layers.values()])) for key in scalar_keys}
        return {"tokens": self.tokens, "num_experts": num_experts, "layers": layers, "mean": mean}

    def expert_load_matrix(self) -> np.ndarray:
        """(L, E) fraction of each layer's assignments per expert, for the utilisation heatmap."""
        return self.assignments_LE / np.clip(self.assignments_LE.sum(1, keepdims=True), 1, None)
