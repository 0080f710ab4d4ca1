"""Turn trace windows into learned-predictor inputs and training targets.

Shape legend (docs/glossary.md): B windows, T tokens per window, L MoE layers, E experts, H hidden width, D lookaheads
(entry ``j`` is lookahead ``d = j + 1``: layer ``l + j + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speculation.predictors.learned import PredictorInputs
from speculation.traces.batches import router_distribution, would_be_misses


@dataclass
class Targets:
    """What the losses compare predictions with, aligned to the model's [B, T, L, D] outputs."""

    top1_BTLD: torch.Tensor  # long, the router's top-1 expert at layer l + d (-1 where undefined)
    probs_BTLDE: torch.Tensor  # float32, the router's distribution at layer l + d
    valid_BTLD: torch.Tensor  # bool: a real token, l + d < L and a top-1 exists
    pair_BT: torch.Tensor  # bool: token t - 1 is a real token of the same window
    miss_BTLD: torch.Tensor | None  # bool: a would-be miss at layer l + d (None: not asked for)


def shift_layers(values_BTL_: torch.Tensor, max_lookahead: int, fill: float) -> torch.Tensor:
    """[B, T, L, ...] -> [B, T, L, D, ...] where entry (l, j) holds layer l + j + 1 (``fill`` past the last)."""
    num_layers = values_BTL_.shape[2]
    shifted = []
    for j in range(max_lookahead):
        source = values_BTL_[:, :, j + 1 :]
        pad_shape = (*values_BTL_.shape[:2], min(j + 1, num_layers), *values_BTL_.shape[3:])
        shifted.append(torch.cat([source, values_BTL_.new_full(pad_shape, fill)], dim=2)[:, :, :num_layers])
    return torch.stack(shifted, dim=3)


def window_tensors(
    experts_BTLK: np.ndarray,
    logits_BTLE: np.ndarray,
    hidden_BTLH: np.ndarray,
    mask_BT: np.ndarray,
    score: str,
    max_lookahead: int,
    miss_window: int | None = None,
) -> tuple[PredictorInputs, Targets]:
    """Model inputs and targets for a batch of padded windows (numpy in, float32/long torch out); the would-be
    misses over ``miss_window`` tokens only when it is given (the miss-weighted loss needs them)."""
    probs = torch.from_numpy(router_distribution(logits_BTLE, score))
    mask = torch.from_numpy(np.asarray(mask_BT, dtype=bool))
    top1 = torch.from_numpy(np.asarray(experts_BTLK[..., 0], dtype=np.int64))
    top1 = torch.where(mask[..., None], top1, torch.full_like(top1, -1))
    top1_BTLD = shift_layers(top1, max_lookahead, fill=-1)
    pair = torch.zeros_like(mask)
    pair[:, 1:] = mask[:, 1:] & mask[:, :-1]
    inputs = PredictorInputs(
        probs_BTLE=probs, hidden_BTLH=torch.from_numpy(np.asarray(hidden_BTLH, dtype=np.float32)), mask_BT=mask
    )
    targets = Targets(
        top1_BTLD=top1_BTLD,
        probs_BTLDE=shift_layers(probs, max_lookahead, fill=0.0),
        valid_BTLD=top1_BTLD >= 0,
        pair_BT=pair,
        miss_BTLD=None,
    )
    if miss_window is not None:
        misses_BTL = torch.from_numpy(window_misses(experts_BTLK, mask_BT, miss_window))
        targets.miss_BTLD = shift_layers(misses_BTL, max_lookahead, fill=0) > 0
    return inputs, targets


def window_misses(experts_BTLK: np.ndarray, mask_BT: np.ndarray, window: int) -> np.ndarray:
    """[B, T, L] uint8: the would-be misses of each layer, each window one sequence (padding never counts)."""
    batch, time, num_layers, _ = experts_BTLK.shape
    mask_N = np.asarray(mask_BT, dtype=bool).reshape(-1)
    experts_NLK = np.where(mask_N[:, None, None], np.asarray(experts_BTLK).reshape(batch * time, num_layers, -1), -1)
    prev_N = np.arange(batch * time) - 1
    prev_N[(np.arange(batch * time) % time == 0) | ~np.r_[False, mask_N[:-1]]] = -1
    misses = [would_be_misses(experts_NLK[:, layer], prev_N, window) for layer in range(num_layers)]
    return (np.stack(misses, 1) & mask_N[:, None]).reshape(batch, time, num_layers).astype(np.uint8)


def top1_marginal(experts_NLK: np.ndarray, num_experts: int, max_lookahead: int) -> torch.Tensor:
    """[L, D, E] observed distribution of the router's top-1 at layer l + j + 1 (uniform past the last layer)."""
    num_layers = experts_NLK.shape[1]
    marginal_LE = np.stack(
        [np.bincount(top1[top1 >= 0], minlength=num_experts) + 1.0 for top1 in experts_NLK[:, :, 0].T]
    )
    marginal_LE /= marginal_LE.sum(1, keepdims=True)
    shifted = np.full((num_layers, max_lookahead, num_experts), 1.0 / num_experts)
    for layer in range(num_layers):
        for j in range(max_lookahead):
            if layer + j + 1 < num_layers:
                shifted[layer, j] = marginal_LE[layer + j + 1]
    return torch.from_numpy(shifted).float()
