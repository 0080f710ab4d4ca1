"""The embedded decoder-only Switch Transformer LM.

Shape legend (docs/glossary.md): B batch, T tokens, H model width, F FFN width, V vocabulary, E experts, K experts
per token.

Laid out like switch-base-8's decoder (pre-norm RMSNorm, ReLU FFNs without biases, MoE FFN in every
``moe_every``-th layer) but causal-only and with learned absolute positions, so it trains from scratch on a CPU.
Sequences are right-padded: with causal attention a real token never sees the padding after it, so no key mask
is needed and ``scaled_dot_product_attention`` can use its fused causal kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speculation.config.model import ModelConfig, RouterConfig
from speculation.models.router import Router, RouterOutput


class FeedForward(nn.Module):
    """T5/Switch FFN: ``wo(relu(wi(x)))``, no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x_NH))))


class MoEFeedForward(nn.Module):
    """A router plus ``E`` expert FFNs; each token's output is the gate-weighted sum of its experts' outputs.

    Dropped and unused slots contribute nothing, so a dropped token passes through on the residual alone.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, router_cfg: RouterConfig, dropout: float = 0.0):
        super().__init__()
        self.router = Router(d_model, num_experts, router_cfg)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff, dropout) for _ in range(num_experts))

    def forward(self, x_BTH: torch.Tensor, mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        route = self.router(x_BTH, mask_BT)
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        experts_NK = route.experts_BTK.reshape(x_NH.shape[0], -1)
        gates_NK = route.gates_BTK.reshape(x_NH.shape[0], -1).to(x_NH.dtype)
        out_NH = torch.zeros_like(x_NH)
        for index, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.nonzero(experts_NK == index, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            weighted = expert(x_NH[token_idx]) * gates_NK[token_idx, slot_idx, None]
            out_NH.index_add_(0, token_idx, weighted)
        return out_NH.view_as(x_BTH), route


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        batch, time, width = x_BTH.shape
        q, k, v = self.qkv(x_BTH).split(width, dim=-1)
        q, k, v = (t.view(batch, time, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    """Pre-norm block; the FFN is an MoE in MoE layers. The router sees the normed hidden state."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.ffn: nn.Module = (
            MoEFeedForward(cfg.d_model, cfg.d_ff, cfg.num_experts, router_cfg, cfg.dropout)
            if is_moe
            else FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTH: torch.Tensor, mask_BT: torch.Tensor | None) -> tuple[torch.Tensor, RouterOutput | None]:
        x_BTH = x_BTH + self.dropout(self.attn(self.attn_norm(x_BTH)))
        normed = self.ffn_norm(x_BTH)
        if isinstance(self.ffn, MoEFeedForward):
            ffn_out, route = self.ffn(normed, mask_BT)
        else:
            ffn_out, route = self.ffn(normed), None
        return x_BTH + self.dropout(ffn_out), route


@dataclass
class LMOutput:
    logits_BTV: torch.Tensor
    routes: list[RouterOutput]  # one per MoE layer, in depth order
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy over real target tokens (nats)
    aux_loss: torch.Tensor | None = None  # mean over MoE layers of each router's weighted aux loss
    loss: torch.Tensor | None = None  # lm_loss + aux_loss: what training minimises


class SwitchLM(nn.Module):
    """Decoder-only Switch Transformer language model (tied input/output embeddings)."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router_cfg = router_cfg
        self.moe_layers = cfg.moe_layers
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, router_cfg, i in self.moe_layers) for i in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.apply(self._init_weights)
        # GPT-2 scaling: residual branches' output projections shrink with depth so the stream stays O(1).
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "wo.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def routers(self) -> list[Router]:
        """The MoE layers' routers in depth order."""
        return [block.ffn.router for block in self.blocks if isinstance(block.ffn, MoEFeedForward)]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        mask_BT: torch.Tensor | None = None,
        targets_BT: torch.Tensor | None = None,
    ) -> LMOutput:
        """``mask_BT`` marks real (non-padding) tokens; ``targets_BT`` uses -100 for positions without a target."""
        batch, time = tokens_BT.shape
        if time > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {time} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions_T = torch.arange(time, device=tokens_BT.device)
        x_BTH = self.token_embedding(tokens_BT) + self.position_embedding(positions_T)
        routes = []
        for block in self.blocks:
            x_BTH, route = block(x_BTH, mask_BT)
            if route is not None:
                routes.append(route)
        logits_BTV = F.linear(self.final_norm(x_BTH), self.token_embedding.weight)
        output = LMOutput(logits_BTV=logits_BTV, routes=routes)
        if targets_BT is not None:
            output.lm_loss = F.cross_entropy(
                logits_BTV.float().reshape(batch * time, -1), targets_BT.reshape(-1), ignore_index=-100
            )
            output.aux_loss = torch.stack([route.aux_loss for route in routes]).mean()
            output.loss = output.lm_loss + output.aux_loss
        return output

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; ``active_only`` counts only the experts a token uses (k of E)."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        expert_params = sum(
            p.numel()
            for block in self.blocks
            if isinstance(block.ffn, MoEFeedForward)
            for p in block.ffn.experts.parameters()
        )
        active_fraction = self.router_cfg.max_experts_per_token / self.cfg.num_experts
        return int(total - expert_params * (1 - active_fraction))
