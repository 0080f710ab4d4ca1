"""Model adapters: where a model's routers are and how to read one router call.

The recorder is model-agnostic; everything family-specific lives in an adapter. Adding a family means writing one
adapter (find the router modules, turn a hook's inputs/output into a :class:`RouterCapture`, describe the expert
geometry) and listing it in :data:`speculation.tracing.registry.ADAPTERS`; the recorder does not change. This module
holds the interface and the embedded model's adapter; the HuggingFace families are in ``hf_adapters.py``.

Shape legend (docs/glossary.md): N tokens (the batch flattened row-major over (B, T)), E experts, K experts per
token, H hidden width.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class RouterSite:
    """One router module in a model."""

    label: str  # stable, human-readable layer label used in traces, e.g. "decoder.1"
    stack: str  # which token stream feeds it ("decoder"; "encoder" for encoder-decoder models)
    layer: int  # index of the transformer layer it belongs to
    module: nn.Module


@dataclass
class RouterCapture:
    """What one router call decided, flattened over tokens (padding still included)."""

    logits_NE: torch.Tensor  # scores whose softmax is the routing distribution
    experts_NK: torch.Tensor  # selected experts, -1 = dropped/unused
    gates_NK: torch.Tensor  # weights applied to the experts' outputs
    dropped_NK: torch.Tensor  # bool: chosen but dropped for capacity
    hidden_NH: torch.Tensor  # the hidden state entering the router

    def to(self, device: torch.device) -> RouterCapture:
        """The same capture with every tensor on ``device`` (a no-op for tensors already there)."""
        return RouterCapture(*(getattr(self, field.name).to(device) for field in fields(self)))


class ModelAdapter:
    """Family-specific knowledge the recorder needs. Subclass once per model family and list it in the registry."""

    family: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[RouterSite]:
        raise NotImplementedError

    def capture(self, site: RouterSite, args: tuple, kwargs: dict, output: Any) -> RouterCapture:
        raise NotImplementedError

    def geometry(self, model: nn.Module) -> dict[str, Any]:
        """Expert geometry for the manifest: d_model, d_ff, num_experts, top_k, moe_layers, dtype, bytes_per_expert."""
        raise NotImplementedError

    def router_state(self, site: RouterSite) -> dict[str, torch.Tensor]:
        """Router parameters needed to re-apply this router elsewhere (the gate-lookahead baseline)."""
        return {name: param.detach().cpu() for name, param in site.module.state_dict().items()}

    def router_scores(self, site: RouterSite, hidden_NH: torch.Tensor) -> torch.Tensor:
        """The deterministic scoring part of ``site``'s router applied to ``hidden_NH`` [N, H]: float32 scores [N, E]
        on ``hidden_NH``'s device, computed as ``RouterBank.scores`` computes them from the exported weights (no
        noise, no span sharing, no selection), without running the router module (whose hooks record routing)."""
        raise NotImplementedError

    def routing_meta(self, model: nn.Module) -> dict[str, Any]:
        """How a router turns logits into choices, for re-applying it (gate-lookahead) and reading its logits.

        ``score``: "softmax" or "sigmoid" (DeepSeek-V3); plus any family-specific knobs (renormalisation,
        group limits, scaling, capacity) under their config names.
        """
        return {"score": "softmax"}


class EmbeddedSwitchAdapter(ModelAdapter):
    """Our own :class:`~speculation.models.switch_lm.SwitchLM`: its routers return a ``RouterOutput``."""

    family = "embedded_switch"

    def matches(self, model: nn.Module) -> bool:
        from speculation.models.switch_lm import SwitchLM

        return isinstance(model, SwitchLM)

    def sites(self, model: nn.Module) -> list[RouterSite]:
        from speculation.models.switch_lm import MoEFeedForward

        return [
            RouterSite(label=f"decoder.{index}", stack="decoder", layer=index, module=block.ffn.router)
            for index, block in enumerate(model.blocks)
            if isinstance(block.ffn, MoEFeedForward)
        ]

    def capture(self, site: RouterSite, args: tuple, kwargs: dict, output: Any) -> RouterCapture:
        hidden_BTH = args[0] if args else kwargs["x_BTH"]
        num_tokens = hidden_BTH.shape[0] * hidden_BTH.shape[1]
        return RouterCapture(
            logits_NE=output.logits_BTE.reshape(num_tokens, -1),
            experts_NK=output.experts_BTK.reshape(num_tokens, -1),
            gates_NK=output.gates_BTK.reshape(num_tokens, -1),
            dropped_NK=output.dropped_BTK.reshape(num_tokens, -1),
            hidden_NH=hidden_BTH.reshape(num_tokens, -1),
        )

    def router_scores(self, site: RouterSite, hidden_NH: torch.Tensor) -> torch.Tensor:
        # Router.scores is the gate (linear / noisy without its training noise / cosine) and the temperature.
        device = next(site.module.parameters()).device
        return site.module.scores(hidden_NH.to(device)).to(hidden_NH.device)

    def routing_meta(self, model: nn.Module) -> dict[str, Any]:
        # The router config (enums as their names) is what rebuilds a Router for the gate-lookahead baseline.
        return {"score": "softmax", "router_config": json.loads(json.dumps(asdict(model.router_cfg), default=str))}

    def geometry(self, model: nn.Module) -> dict[str, Any]:
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        bytes_per_param = torch.finfo(dtype).bits // 8
        return {
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "num_experts": cfg.num_experts,
            "top_k": model.router_cfg.max_experts_per_token,
            "num_layers": cfg.num_layers,
            "moe_layers": list(model.moe_layers),
            "dtype": str(dtype).removeprefix("torch."),
            "bytes_per_expert": 2 * cfg.d_model * cfg.d_ff * bytes_per_param,  # wi and wo, no biases
            "vocab_size": cfg.vocab_size,
        }
