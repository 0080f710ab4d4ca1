"""Token-choice routers for the embedded Switch LM, returning a typed :class:`RouterOutput`.

Shape legend (docs/glossary.md): B batch, T tokens, H model width (the hidden state), E experts, K max experts per
token (k, or k_max when adaptive).

Every variant is one module configured by :class:`~speculation.config.RouterConfig`:
scoring (``gate``: linear / noisy / cosine) -> temperature -> optional span sharing -> selection (top-k or
entropy-adaptive k) -> optional capacity dropping. Aux losses are returned, never stashed in module globals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speculation.config.model import Gate, RouterConfig, Selection


@dataclass
class RouterOutput:
    """One router call. ``probs = softmax(logits)`` is the routing distribution the traces record."""

    logits_BTE: torch.Tensor  # float32 scores after temperature (and span sharing): what the softmax sees
    probs_BTE: torch.Tensor  # float32
    experts_BTK: torch.Tensor  # long, -1 = slot unused (adaptive k), dropped (capacity) or padding
    gates_BTK: torch.Tensor  # float32 weights of the expert outputs, 0 where experts == -1
    dropped_BTK: torch.Tensor  # bool, slot chosen by the router but over its expert's capacity
    load_balance_loss: torch.Tensor  # scalar, Switch eq. 4
    z_loss: torch.Tensor  # scalar, ST-MoE eq. 5
    aux_loss: torch.Tensor  # scalar, load_balance_coef * lb + z_loss_coef * z


def load_balancing_loss(probs_NE: torch.Tensor, experts_NK: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4: ``E * sum_i f_i * P_i`` over real tokens.

    ``f_i`` is the fraction of tokens that chose expert ``i`` (any of their k slots, before capacity dropping)
    and ``P_i`` the mean router probability of expert ``i``. Equals 1 under perfect balance.
    """
    num_experts = probs_NE.shape[-1]
    weight_N = mask_N.float()
    denominator = weight_N.sum().clamp_min(1.0)
    chosen_NE = torch.zeros_like(probs_NE)
    valid_NK = experts_NK >= 0
    chosen_NE.scatter_(1, experts_NK.clamp_min(0), valid_NK.float())  # a token counts once per expert
    fraction_E = (chosen_NE * weight_N[:, None]).sum(0) / denominator
    mean_prob_E = (probs_NE * weight_N[:, None]).sum(0) / denominator
    return num_experts * (fraction_E * mean_prob_E).sum()


def router_z_loss(logits_NE: torch.Tensor, mask_N: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean over real tokens of ``logsumexp(logits)^2``; keeps router logits small."""
    z_N = torch.logsumexp(logits_NE.float(), dim=-1) ** 2
    return (z_N * mask_N.float()).sum() / mask_N.float().sum().clamp_min(1.0)


def adaptive_k(probs_NE: torch.Tensor, k_max: int) -> torch.Tensor:
    """Experts per token from the router's normalised entropy: ``clamp(ceil(k_max * H / ln E), 1, k_max)``.

    A peaked distribution (H ~ 0) gets 1 expert, a flat one (H = ln E) gets k_max.
    """
    num_experts = probs_NE.shape[-1]
    if num_experts == 1:
        return torch.ones(probs_NE.shape[0], dtype=torch.long, device=probs_NE.device)
    entropy_N = -(probs_NE * torch.log(probs_NE.clamp_min(1e-12))).sum(-1)
    # The tolerance keeps a flat distribution's float error (H a hair above ln E) from needing k_max + 1.
    fraction_N = (entropy_N / math.log(num_experts)).clamp(0.0, 1.0) - 1e-6
    return torch.ceil(k_max * fraction_N).long().clamp(1, k_max)


def capacity_keep_mask(experts_NK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which (token, slot) assignments fit in their expert's capacity.

    Priority follows GShard/Switch: every token's first choice before any second choice, and within a rank the
    earlier token first. Slots with expert -1 neither consume capacity nor are kept.
    """
    num_tokens, k = experts_NK.shape
    order_KN = experts_NK.t()  # rank-major: all first choices, then all second choices, ...
    valid = order_KN >= 0
    onehot = F.one_hot(order_KN.clamp_min(0), num_experts) * valid[..., None]
    position = torch.cumsum(onehot.reshape(k * num_tokens, num_experts), dim=0).reshape(k, num_tokens, num_experts)
    position_in_expert = (position * onehot).sum(-1) - 1  # 0-based arrival index at the chosen expert
    keep_KN = valid & (position_in_expert < capacity)
    return keep_KN.t()


class Router(nn.Module):
    """Scores tokens against experts and picks each token's experts (see module docstring)."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1.")
        self.cfg = cfg
        self.num_experts = num_experts
        self.max_k = min(cfg.max_experts_per_token, num_experts)
        if cfg.gate == Gate.cosine:
            self.proj = nn.Linear(d_model, cfg.cosine_dim, bias=False)
            self.expert_embeddings = nn.Parameter(torch.randn(num_experts, cfg.cosine_dim) * 0.02)
            # Learned inverse temperature (X-MoE): cosines live in [-1, 1] and need scaling to route sharply.
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        else:
            self.weight = nn.Linear(d_model, num_experts, bias=False)
        if cfg.gate == Gate.noisy:
            self.noise = nn.Linear(d_model, num_experts, bias=False)
            nn.init.zeros_(self.noise.weight)

    def scores(self, x_BTH: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits before span sharing, in float32 (selective precision)."""
        x_BTH = x_BTH.float()
        if self.cfg.gate == Gate.cosine:
            projected = F.normalize(F.linear(x_BTH, self.proj.weight.float()), dim=-1)
            experts = F.normalize(self.expert_embeddings.float(), dim=-1)
            logits = projected @ experts.t() * self.log_scale.clamp(max=math.log(100.0)).exp()
        else:
            logits = F.linear(x_BTH, self.weight.weight.float())
        if self.cfg.gate == Gate.noisy and self.training:
            noise_std = F.softplus(F.linear(x_BTH, self.noise.weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits / self.cfg.temperature

    def forward(self, x_BTH: torch.Tensor, mask_BT: torch.Tensor | None = None) -> RouterOutput:
        batch, time, _ = x_BTH.shape
        if mask_BT is None:
            mask_BT = torch.ones(batch, time, dtype=torch.bool, device=x_BTH.device)
        logits_BTE = self.scores(x_BTH)
        if self.cfg.span_length > 1:
            # The span's first token decides for the whole span, so routing stays causal.
            leader_T = torch.arange(time, device=x_BTH.device) // self.cfg.span_length * self.cfg.span_length
            logits_BTE = logits_BTE[:, leader_T]
        probs_BTE = torch.softmax(logits_BTE, dim=-1)

        probs_NE = probs_BTE.reshape(batch * time, -1)
        mask_N = mask_BT.reshape(-1)
        top_probs_NK, experts_NK = probs_NE.topk(self.max_k, dim=-1)
        if self.cfg.selection == Selection.adaptive_k:
            k_N = adaptive_k(probs_NE, self.max_k)
            used_NK = torch.arange(self.max_k, device=x_BTH.device)[None, :] < k_N[:, None]
        else:
            used_NK = torch.ones_like(experts_NK, dtype=torch.bool)
        used_NK &= mask_N[:, None]
        experts_NK = torch.where(used_NK, experts_NK, -1)

        # A lone expert keeps its raw probability (Switch: the router gets a gradient through the gate);
        # several experts share renormalised weights (Mixtral, GShard top-2).
        top_probs_NK = top_probs_NK * used_NK
        several_N = used_NK.sum(-1) > 1
        gates_NK = torch.where(
            several_N[:, None], top_probs_NK / top_probs_NK.sum(-1, keepdim=True).clamp_min(1e-9), top_probs_NK
        )
        load_balance = load_balancing_loss(probs_NE, experts_NK, mask_N)
        z_loss = router_z_loss(logits_BTE.reshape(batch * time, -1), mask_N)

        dropped_NK = torch.zeros_like(used_NK)
        if self.cfg.capacity_factor is not None:
            real_tokens = int(mask_N.sum())
            capacity = math.ceil(self.cfg.capacity_factor * real_tokens * self.max_k / self.num_experts)
            keep_NK = capacity_keep_mask(experts_NK, self.num_experts, capacity)
            dropped_NK = used_NK & ~keep_NK
            experts_NK = torch.where(keep_NK, experts_NK, -1)
            gates_NK = gates_NK * keep_NK

        return RouterOutput(
            logits_BTE=logits_BTE,
            probs_BTE=probs_BTE,
            experts_BTK=experts_NK.reshape(batch, time, -1),
            gates_BTK=gates_NK.reshape(batch, time, -1),
            dropped_BTK=dropped_NK.reshape(batch, time, -1),
            load_balance_loss=load_balance,
            z_loss=z_loss,
            aux_loss=self.cfg.load_balance_coef * load_balance + self.cfg.z_loss_coef * z_loss,
        )
