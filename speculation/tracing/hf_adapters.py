"""Adapters for HuggingFace MoE families (transformers >= 5.18 module layout).

Two kinds of router are covered:

* Switch Transformers' ``SwitchTransformersTop1Router`` (encoder and decoder stacks; top-1 with a per-sequence
  expert capacity, so tokens can be dropped). It returns ``(dispatch one-hot [B,T,E] after capacity,
  max prob [B,T,1], logits [B,T,E])``.
* The ``*TopKRouter`` of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3 and GPT-OSS. Each returns
  ``(logits [N,E], top-k weights [N,K], top-k indices [N,K])``. We record the indices the router returned rather
  than re-deriving them from the logits: DeepSeek-V3 selects on sigmoid scores plus a correction bias inside
  groups, DeepSeek-V2 limits groups too, so the top-k of the logits is not always what ran.

transformers is imported lazily (when a model's routers are looked up), so importing this module is cheap.
Shape legend (docs/glossary.md): B batch, T tokens, N = B*T tokens (row-major), E experts, K experts per token,
H hidden width.
"""

from __future__ import annotations

import importlib
import itertools
import re
from typing import Any

import torch
from torch import nn

from speculation.errors import UserError
from speculation.tracing.adapters import ModelAdapter, RouterCapture, RouterSite


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _router_class(family: str, class_name: str) -> type[nn.Module]:
    import transformers

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if not hasattr(module, class_name):
        raise UserError(
            f"transformers {transformers.__version__} has no {class_name}; tracing {family} needs the "
            'transformers >= 5.18 module layout: pip install "transformers>=5.18".'
        )
    return getattr(module, class_name)


def _named_routers(model: nn.Module, router_class: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, router_class)]


def _parent(model: nn.Module, name: str) -> nn.Module:
    """The module holding the router: the MoE block, with the experts beside it."""
    return model.get_submodule(name.rpartition(".")[0])


def _module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _expert_bytes_and_dtype(experts: nn.Module, num_experts: int) -> tuple[int, torch.dtype]:
    """Bytes of one expert's parameters (weights and biases), read from the real tensors.

    Experts are either one module each (Switch's ``expert_0``...) or fused tensors whose leading dim is the
    expert (Mixtral-style ``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F], GPT-OSS biases [E, ...]).
    """
    if isinstance(experts, nn.ModuleDict | nn.ModuleList):
        first = next(iter(experts.values() if isinstance(experts, nn.ModuleDict) else experts))
        return _module_bytes(first), next(first.parameters()).dtype
    params = list(experts.parameters())
    bad = [tuple(p.shape) for p in params if p.shape[0] != num_experts]
    assert not bad, f"fused expert tensors should lead with {num_experts} experts, got shapes {bad}"
    return sum(p.numel() // num_experts * p.element_size() for p in params), params[0].dtype


# Router attribute -> config name of the knobs a router forward reads.
_ROUTER_KNOBS = {
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
    "topk_method": "topk_method",
    "num_group": "n_group",
    "topk_group": "topk_group",
}


def sort_slots(experts_NK: torch.Tensor, gates_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each token's slots by gate weight, heaviest first (ties: lower expert id first).

    Some routers return their top-k unsorted (``sorted=False``); a fixed order makes slot 0 mean "the heaviest
    expert" for every family. Only the order changes, never the selected set.
    """
    by_id = experts_NK.argsort(dim=-1, stable=True)
    experts_NK, gates_NK = experts_NK.gather(-1, by_id), gates_NK.gather(-1, by_id)
    by_gate = gates_NK.argsort(dim=-1, descending=True, stable=True)
    return experts_NK.gather(-1, by_gate), gates_NK.gather(-1, by_gate)


class _HFAdapter(ModelAdapter):
    """What the HF families share: matching on ``config.model_type`` and exporting router tensors."""

    router_class_name: str = ""
    expert_matrices: int = 3

    def matches(self, model: nn.Module) -> bool:
        return _model_type(model) == self.family

    def _routers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return _named_routers(model, _router_class(self.family, self.router_class_name))

    def router_state(self, site: RouterSite) -> dict[str, torch.Tensor]:
        # A router Accelerate offloaded (device_map with cpu/disk entries under an execution device) holds meta
        # tensors between forward passes; align_module_device loads its real weights for the copy.
        from accelerate.utils import align_module_device

        with align_module_device(site.module):
            # Buffers too: DeepSeek-V3's e_score_correction_bias changes which experts are chosen.
            named = itertools.chain(site.module.named_parameters(), site.module.named_buffers())
            return {name: tensor.detach().cpu().clone() for name, tensor in named}

    def _linear(self, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router's (weight [E, H], bias [E] or None): what RouterBank rebuilds as an ``nn.Linear``."""
        return router.weight, getattr(router, "bias", None)

    def router_scores(self, site: RouterSite, hidden_NH: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import align_module_device

        with align_module_device(site.module):  # an offloaded router's real weights, for this call
            weight, bias = self._linear(site.module)
            device = weight.device
            scores = torch.nn.functional.linear(
                hidden_NH.to(device).float(), weight.float(), None if bias is None else bias.float()
            )
        return scores.to(hidden_NH.device)

    def _expert_geometry(self, model: nn.Module, num_experts: int) -> dict[str, Any]:
        """Bytes per routed expert and per layer of shared experts, from the first MoE block's tensors."""
        first_name = self._routers(model)[0][0]
        block = _parent(model, first_name)
        bytes_per_expert, dtype = _expert_bytes_and_dtype(block.experts, num_experts)
        shared = [getattr(block, name) for name in ("shared_expert", "shared_experts") if hasattr(block, name)]
        return {
            "dtype": str(dtype).removeprefix("torch."),
            "expert_matrices": self.expert_matrices,
            "bytes_per_expert": bytes_per_expert,
            "shared_expert_bytes": sum(_module_bytes(module) for module in shared),
        }


class SwitchTransformersAdapter(_HFAdapter):
    """SwitchTransformers (ForConditionalGeneration, Model, EncoderModel): top-1 routers in both stacks."""

    family = "switch_transformers"
    router_class_name = "SwitchTransformersTop1Router"
    expert_matrices = 2  # wi, wo (ReLU FFN, no gate)
    _NAME = re.compile(r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.")

    def sites(self, model: nn.Module) -> list[RouterSite]:
        sites = []
        for name, module in self._routers(model):
            found = self._NAME.search(name)
            assert found, f"cannot tell the stack and block of Switch router {name!r}"
            stack, block = found.group(1), int(found.group(2))
            sites.append(RouterSite(label=f"{stack}.{block}", stack=stack, layer=block, module=module))
        return sites

    def _linear(self, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return router.classifier.weight, router.classifier.bias  # router_dtype (float32) logits of the classifier

    def capture(self, site: RouterSite, args: tuple, kwargs: dict, output: Any) -> RouterCapture:
        dispatch_BTE, max_prob_BT1, logits_BTE = output
        hidden_BTH = args[0] if args else kwargs["hidden_states"]
        num_experts = logits_BTE.shape[-1]
        dispatch_NE = dispatch_BTE.reshape(-1, num_experts)
        # The one-hot is already masked by capacity: an all-zero row is a token whose expert was full.
        kept_N1 = dispatch_NE.any(dim=-1, keepdim=True)
        experts_N1 = torch.where(kept_N1, dispatch_NE.argmax(dim=-1, keepdim=True), -1)
        gates_N1 = torch.where(kept_N1, max_prob_BT1.reshape(-1, 1), 0)
        return RouterCapture(
            logits_NE=logits_BTE.reshape(-1, num_experts).float(),
            experts_NK=experts_N1,
            gates_NK=gates_N1,
            dropped_NK=~kept_N1,
            hidden_NH=hidden_BTH.reshape(-1, hidden_BTH.shape[-1]),
        )

    def geometry(self, model: nn.Module) -> dict[str, Any]:
        config = model.config
        sites = self.sites(model)
        router = sites[0].module
        # EncoderModel has no decoder: count the blocks that exist rather than trust num_decoder_layers.
        decoder = getattr(model, "decoder", None)
        return {
            "model_type": self.family,
            "d_model": config.d_model,
            "d_ff": config.d_ff,
            "num_experts": router.num_experts,
            "top_k": 1,
            "num_layers": len(decoder.block) if decoder is not None else 0,
            "num_encoder_layers": len(model.encoder.block),
            "moe_layers": [s.layer for s in sites if s.stack == "decoder"],
            "encoder_moe_layers": [s.layer for s in sites if s.stack == "encoder"],
            "vocab_size": config.vocab_size,
            **self._expert_geometry(model, router.num_experts),
        }

    def routing_meta(self, model: nn.Module) -> dict[str, Any]:
        config = model.config
        return {
            "score": "softmax",
            "top_k": 1,
            "norm_topk_prob": False,  # the gate is the raw max probability
            "routed_scaling_factor": 1.0,
            "router_bias": bool(config.router_bias),
            "router_dtype": config.router_dtype,
            # Priority is the token's position: within each sequence (row of the batch), the first
            # expert_capacity tokens choosing an expert are kept, later ones dropped (pass on the residual).
            "expert_capacity": int(config.expert_capacity),
            "capacity_scope": "sequence",
        }


class TopKRouterAdapter(_HFAdapter):
    """Decoder-only families whose router returns ``(logits [N,E], weights [N,K], indices [N,K])``.

    ``meta`` holds routing facts that are not attributes of the router module (e.g. Mixtral always
    renormalises its top-k weights; DeepSeek-V3 scores with a sigmoid).
    """

    _NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def __init__(
        self, family: str, router_class_name: str, meta: dict[str, Any] | None = None, sorted_topk: bool = True
    ) -> None:
        self.family = family
        self.router_class_name = router_class_name
        self.meta = meta or {}
        # Routers built on torch.topk(sorted=True) already return slots heaviest first; re-sorting them would only
        # cost time in collect(). DeepSeek's use sorted=False.
        self.sorted_topk = sorted_topk

    def sites(self, model: nn.Module) -> list[RouterSite]:
        sites = []
        for name, module in self._routers(model):
            found = self._NAME.search(name)
            assert found, f"cannot tell the decoder layer of {self.family} router {name!r}"
            layer = int(found.group(1))
            sites.append(RouterSite(label=f"decoder.{layer}", stack="decoder", layer=layer, module=module))
        return sites

    def capture(self, site: RouterSite, args: tuple, kwargs: dict, output: Any) -> RouterCapture:
        logits_NE, weights_NK, indices_NK = output
        hidden = args[0] if args else kwargs["hidden_states"]
        experts_NK, gates_NK = (indices_NK, weights_NK) if self.sorted_topk else sort_slots(indices_NK, weights_NK)
        return RouterCapture(
            logits_NE=logits_NE.reshape(-1, logits_NE.shape[-1]).float(),
            experts_NK=experts_NK,
            gates_NK=gates_NK,
            dropped_NK=torch.zeros_like(experts_NK, dtype=torch.bool),  # no capacity: nothing is dropped
            hidden_NH=hidden.reshape(-1, hidden.shape[-1]),
        )

    def geometry(self, model: nn.Module) -> dict[str, Any]:
        config = model.config
        sites = self.sites(model)
        router = sites[0].module
        d_ff = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        return {
            "model_type": self.family,
            "d_model": config.hidden_size,
            "d_ff": d_ff,
            "num_experts": router.num_experts,
            "top_k": router.top_k,
            "num_layers": config.num_hidden_layers,
            "moe_layers": [s.layer for s in sites],
            "vocab_size": config.vocab_size,
            **self._expert_geometry(model, router.num_experts),
        }

    def routing_meta(self, model: nn.Module) -> dict[str, Any]:
        # Read the knobs from the router module: they are what its forward uses (config names differ by family,
        # and some behaviour, like Mixtral's renormalisation, has no config key at all).
        router = self.sites(model)[0].module
        meta: dict[str, Any] = {
            "score": "softmax",
            "top_k": router.top_k,
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "router_bias": getattr(router, "bias", None) is not None,  # GPT-OSS
        }
        meta.update({key: getattr(router, attr) for attr, key in _ROUTER_KNOBS.items() if hasattr(router, attr)})
        meta.update(self.meta)
        return meta
