"""Figures written by the stages (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def utilisation_heatmap(load_LE: np.ndarray, layer_labels: list[str], path: Path, title: str = "") -> Path:
    """Layers x experts heatmap of the fraction of each layer's tokens sent to each expert."""
    num_layers, num_experts = load_LE.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * num_experts + 2), max(2.5, 0.4 * num_layers + 1.2)))
    image = ax.imshow(load_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load_LE.max()), 1e-9))
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), labels=layer_labels)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or f"expert utilisation (uniform = {1 / num_experts:.3f})")
    if num_experts * num_layers <= 256:
        for layer in range(num_layers):
            for expert in range(num_experts):
                value = load_LE[layer, expert]
                color = "black" if value > 0.6 * load_LE.max() else "white"
                ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
