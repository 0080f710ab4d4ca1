"""The simulator's timing model, all in one place so that the real engine (``spec-calibrate``) can calibrate it.

Batch-1 decode: every kernel reads its weights once, so a kernel's time is the roofline
``max(flops / peak, bytes / memory bandwidth)`` plus its launch; a host-to-device copy costs
``latency + bytes / link bandwidth`` and copies queue on one link in issue order (one copy stream).
The KV-cache reads of attention are left out: they grow with the context and are the same for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from speculation.config.simulate import HardwareConfig, TargetConfig
from speculation.traces.manifest import Manifest


def resolve_target(target: TargetConfig, manifest: Manifest) -> TargetConfig:
    """``target`` itself, or for ``target=traced`` the traced model's own sizes (the dense-work fields keep
    ``target``'s values)."""
    if target.name != "traced":
        return target
    geometry = manifest.geometry
    d_model = int(geometry["d_model"])
    return TargetConfig(
        name=manifest.model_name,
        d_model=d_model,
        d_ff=int(geometry["d_ff"]),
        expert_matrices=target.expert_matrices,
        bytes_per_param=target.bytes_per_param,
        blocks_per_moe_layer=target.blocks_per_moe_layer,
        attention_params=4 * d_model * d_model,
        dense_d_ff=int(geometry["d_ff"]) if target.dense_d_ff else 0,
        kernels_per_block=target.kernels_per_block,
        vocab_size=int(geometry.get("vocab_size") or target.vocab_size),  # the LM head the traced model reads
        num_experts=int(geometry["num_experts"]),
    )


@dataclass(frozen=True)
class TimingModel:
    """Seconds for each piece of one decode step; built from a hardware and a target profile."""

    copy_s: float  # one expert, host to device
    expert_s: float  # one expert's FFN for one token
    non_expert_s: float  # the rest of one MoE layer (attention, dense blocks, router), per token
    head_s: float  # the LM head, once per token
    expert_bytes: int

    @classmethod
    def from_profiles(cls, hardware: HardwareConfig, target: TargetConfig) -> TimingModel:
        if hardware.pinned:  # decode copies overlap kernels: prefer the bandwidth measured under compute
            link_gbs = hardware.h2d_under_compute_gbs or hardware.h2d_pinned_gbs
        else:
            link_gbs = hardware.h2d_pageable_gbs
        nbytes = target.bytes_per_param
        launch = hardware.launch_us * 1e-6

        def kernel_s(params: int, kernels: int) -> float:
            flops = 2.0 * params  # one token: a multiply-add per weight
            return max(flops / (hardware.fp16_tflops * 1e12), params * nbytes / (hardware.hbm_gbs * 1e9)) + (
                kernels * launch
            )

        blocks = target.blocks_per_moe_layer
        dense_params = (blocks - 1) * 2 * target.d_model * target.dense_d_ff
        non_expert_params = blocks * target.attention_params + dense_params + target.d_model * (target.num_experts or 8)
        return cls(
            copy_s=hardware.copy_latency_us * 1e-6 + target.expert_bytes / (link_gbs * 1e9),
            expert_s=kernel_s(target.expert_params, target.expert_matrices),
            non_expert_s=kernel_s(non_expert_params, blocks * target.kernels_per_block),
            head_s=kernel_s(target.vocab_size * target.d_model, 1),
            expert_bytes=target.expert_bytes,
        )

    def break_even_confidence(self, lookahead: int, experts_per_layer: int = 1) -> float:
        """The confidence above which prefetching a predicted expert pays off on a busy link.

        A right prefetch hides up to ``lookahead`` layers of compute of one copy; a wrong one occupies the link for a
        whole copy that a later copy then waits behind. With the prediction right with probability c, prefetching
        gains when ``c · lookahead · layer_s > (1 - c) · copy_s``.
        """
        hidden = lookahead * (self.non_expert_s + experts_per_layer * self.expert_s)
        return self.copy_s / (self.copy_s + hidden)
