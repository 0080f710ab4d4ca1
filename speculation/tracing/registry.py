"""Every model family the recorder can trace, listed once: :data:`ADAPTERS` by family name.

A new family is one adapter (``adapters.py`` holds the interface) added to the tuple below; nothing registers
itself on import.
"""

from __future__ import annotations

from torch import nn

from speculation.config.rules import Geometry
from speculation.errors import UserError
from speculation.tracing.adapters import EmbeddedSwitchAdapter, ModelAdapter
from speculation.tracing.hf_adapters import SwitchTransformersAdapter, TopKRouterAdapter

# The *TopKRouter families: linear routers over the hidden state, returning (logits, weights, indices).
TOPK_ADAPTERS: tuple[TopKRouterAdapter, ...] = (
    TopKRouterAdapter("mixtral", "MixtralTopKRouter", {"norm_topk_prob": True}),
    TopKRouterAdapter("qwen2_moe", "Qwen2MoeTopKRouter"),
    TopKRouterAdapter("qwen3_moe", "Qwen3MoeTopKRouter"),
    TopKRouterAdapter("olmoe", "OlmoeTopKRouter"),
    # V2: softmax, greedy or group_limited_greedy (group score = max prob in the group), weights * scale.
    TopKRouterAdapter("deepseek_v2", "DeepseekV2TopkRouter", {"group_score": "max"}, sorted_topk=False),
    # V3: select on sigmoid + e_score_correction_bias within the topk_group best groups (group score = sum of
    # its top-2), weigh with the unbiased sigmoid scores, optionally renormalised, times the scale.
    TopKRouterAdapter(
        "deepseek_v3",
        "DeepseekV3TopkRouter",
        {"score": "sigmoid", "topk_method": "noaux_tc", "group_score": "top2_sum"},
        sorted_topk=False,
    ),
    # GPT-OSS: top-k of biased logits, softmax over those k = softmax probs renormalised over the top-k.
    TopKRouterAdapter("gpt_oss", "GptOssTopKRouter", {"norm_topk_prob": True}),
)

ADAPTERS: dict[str, ModelAdapter] = {
    adapter.family: adapter for adapter in (EmbeddedSwitchAdapter(), SwitchTransformersAdapter(), *TOPK_ADAPTERS)
}


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter that recognises ``model``; one clear error otherwise."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise UserError(
        f"{type(model).__name__} is not a supported MoE model; supported families: {', '.join(sorted(ADAPTERS))}."
    )


def stack_geometry(model: nn.Module, stack: str) -> Geometry | None:
    """What the config's rules check (``speculation.config.rules``) for the traces ``stack`` of ``model`` would
    have: its MoE layers, experts and expert slots per token, as the manifest will record them; ``None`` if the
    model has no MoE layer in that stack. Works on a meta-device skeleton (``speculation.models.hf.hf_skeleton``)."""
    adapter = find_adapter(model)
    layers = [site for site in adapter.sites(model) if site.stack == stack]
    if not layers:
        return None
    geometry = adapter.geometry(model)
    return Geometry(len(layers), geometry["num_experts"], geometry["top_k"])
