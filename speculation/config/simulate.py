"""Schemas of the prefetch-cache simulation: the GPU (``conf/hardware/``), the model whose experts are moved
(``conf/target/``) and the sweep (``conf/sim/``).

The traces supply *which* experts each token needs at each MoE layer; the target supplies *how big* they are and
how long the rest of the layer takes, so a small traced model is replayed at a real model's sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from speculation.config.checks import positive, require

POLICIES = ["on_demand", "gate_lookahead", "predictor_topb", "predictor_confidence", "cost_aware", "cost_aware_multi",
            "oracle"]  # fmt: skip
EVICTIONS = ["lru", "lfu", "belady", "predicted", "expected"]  # in the order of the codes of cache/kernel.py


@dataclass
class HardwareConfig:
    """One GPU and its host link; every value has its source in ``conf/hardware/<name>.yaml``."""

    name: str = "rtx3090"
    memory_gb: float = 24.0
    hbm_gbs: float = 936.0  # device memory bandwidth, GB/s
    fp16_tflops: float = 71.0  # dense fp16 tensor-core peak (fp32 accumulate)
    h2d_pinned_gbs: float = 24.0  # host-to-device copy bandwidth from pinned memory, GB/s
    h2d_pageable_gbs: float = 13.0  # from pageable memory
    h2d_under_compute_gbs: float | None = None  # pinned, while kernels run (measured by spec-calibrate); None: pinned
    copy_latency_us: float = 6.0  # fixed cost of one cudaMemcpyAsync call
    launch_us: float = 5.0  # one kernel launch at batch-1 decode
    pinned: bool = True  # experts live in pinned host memory (pageable copies are slower)

    def __post_init__(self) -> None:
        for key in ("memory_gb", "hbm_gbs", "fp16_tflops", "h2d_pinned_gbs", "h2d_pageable_gbs"):
            positive(f"hardware.{key}", getattr(self, key), "Check the profile in conf/hardware/.")
        for key in ("copy_latency_us", "launch_us"):
            require(getattr(self, key) >= 0, f"hardware.{key}={getattr(self, key)} must be >= 0.")
        if self.h2d_under_compute_gbs is not None:
            positive("hardware.h2d_under_compute_gbs", self.h2d_under_compute_gbs, "Or null: use h2d_pinned_gbs.")


@dataclass
class TargetConfig:
    """The model whose experts are offloaded: sizes of one expert and of the dense work around it.

    ``name: traced`` takes d_model and d_ff from the trace manifest (the traced model itself; see
    :func:`speculation.cache.timing.resolve_target`).
    """

    name: str = "switch-base-8"
    d_model: int = 768
    d_ff: int = 3072  # one expert's hidden width
    expert_matrices: int = 2  # 2: wi, wo (ReLU/GELU FFN); 3: gate, up, down (SwiGLU)
    bytes_per_param: int = 2  # fp16 / bf16
    blocks_per_moe_layer: int = 2  # transformer blocks per MoE layer (Switch: every other FFN is sparse)
    attention_params: int = 2_359_296  # q, k, v, o weights of one block (4 · 768²)
    dense_d_ff: int = 3072  # FFN width of the dense blocks between MoE layers (0: every block is MoE)
    kernels_per_block: int = 8  # launches of one block's non-expert part (norms, attention, residuals)
    vocab_size: int = 32128  # the LM head read once per token
    num_experts: int | None = None  # the real model's count: sizes the router's matmul (None: 8); routing is traced

    def __post_init__(self) -> None:
        for key in ("d_model", "d_ff", "expert_matrices", "bytes_per_param", "blocks_per_moe_layer"):
            positive(f"target.{key}", getattr(self, key), "Check the profile in conf/target/.")
        for key in ("attention_params", "dense_d_ff", "kernels_per_block", "vocab_size"):
            require(getattr(self, key) >= 0, f"target.{key}={getattr(self, key)} must be >= 0.")

    @property
    def expert_params(self) -> int:
        return self.expert_matrices * self.d_model * self.d_ff

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.bytes_per_param


@dataclass
class SimConfig:
    """What ``spec-evaluate`` replays in the simulator (``conf/sim/``)."""

    enabled: bool = True
    max_tokens: int = 20000  # replay the split's first tokens (whole sequences), in order, as one decode stream
    # share of all (layer, expert) weights on the GPU; None: the eighths 1/8..7/8 that hold at least one token's
    # experts of a layer (speculation.config.rules.fit_to_geometry fills in every None once the traces are known)
    cache_fractions: list[float] | None = None
    lookaheads: list[int] | None = None  # layers ahead a prefetch is issued; None: 1..3 where the model has them
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    evictions: list[str] = field(default_factory=lambda: list(EVICTIONS))
    budgets: list[int] = field(default_factory=lambda: [1, 2])  # predictor_topb: experts prefetched per layer
    # cost_aware(_multi): weigh each target layer's `candidates` likeliest experts at issue time, copying at most
    # max(budgets) of them per target layer
    candidates: int = 4
    # predictor_confidence: no prefetch below confidence_low, one expert at >= confidence_high, max(budgets) between.
    # None: low = the timing model's break-even confidence at each lookahead (TimingModel.break_even_confidence);
    # high = low (never hedge with a second expert, which on a saturated link costs more than it saves).
    confidence_low: float | None = None
    confidence_high: float | None = None
    predictor_us: float = 10.0  # latency of one learned-predictor step (side stream): delays its prefetches
    # the JSON benchmarks/predictor_cost_bench.py writes: each learned predictor is then charged its kind's measured
    # mean step (us_per_step_mean) instead of predictor_us
    predictor_profile: str | None = None
    headline_fraction: float = 0.5  # the cache fraction the report's main table shows
    headline_lookahead: int | None = None  # None: 2, or the swept lookahead nearest to it

    def __post_init__(self) -> None:
        positive("sim.max_tokens", self.max_tokens)
        if self.cache_fractions is not None:
            require(
                bool(self.cache_fractions),
                "sim.cache_fractions is empty; give at least one fraction in (0, 1], or null for the defaults.",
            )
            for fraction in self.cache_fractions:
                require(0 < fraction <= 1, f"sim.cache_fractions has {fraction}; each must be in (0, 1].")
        if self.lookaheads is not None:
            require(
                bool(self.lookaheads) and min(self.lookaheads) >= 1,
                f"sim.lookaheads={self.lookaheads} must be >= 1 (or null: 1..3 where the traced model has them).",
            )
        unknown = [p for p in self.policies if p not in POLICIES]
        require(not unknown, f"sim.policies has unknown policy(ies) {unknown}; choose from {POLICIES}.")
        unknown = [e for e in self.evictions if e not in EVICTIONS]
        require(not unknown, f"sim.evictions has unknown eviction(s) {unknown}; choose from {EVICTIONS}.")
        require(self.budgets and min(self.budgets) >= 1, f"sim.budgets={self.budgets} must be >= 1.")
        for key in ("confidence_low", "confidence_high"):
            value = getattr(self, key)
            require(value is None or 0 <= value <= 1, f"sim.{key}={value} must be in [0, 1] (or null: automatic).")
        if self.confidence_low is not None and self.confidence_high is not None:
            require(
                self.confidence_low <= self.confidence_high,
                f"sim.confidence_low={self.confidence_low} and confidence_high={self.confidence_high} must satisfy "
                "low <= high.",
            )
        positive("sim.candidates", self.candidates)
        if self.predictor_profile is not None:
            require(
                Path(self.predictor_profile).is_file(),
                f"sim.predictor_profile={self.predictor_profile} is not a file; write it with "
                "benchmarks/predictor_cost_bench.py --out PATH, or set sim.predictor_profile=null.",
            )
        require(self.predictor_us >= 0, f"sim.predictor_us={self.predictor_us} must be >= 0.")
        if self.cache_fractions is not None:
            require(
                any(math.isclose(self.headline_fraction, f) for f in self.cache_fractions),
                f"sim.headline_fraction={self.headline_fraction} is not one of sim.cache_fractions="
                f"{self.cache_fractions}; add it to sim.cache_fractions or pick one of those.",
            )
        if self.lookaheads is not None and self.headline_lookahead is not None:
            require(
                self.headline_lookahead in self.lookaheads,
                f"sim.headline_lookahead={self.headline_lookahead} is not one of sim.lookaheads={self.lookaheads}; "
                "add it to sim.lookaheads or pick one of those.",
            )

    @property
    def ranked_experts(self) -> int:
        """How many of its likeliest experts every prediction keeps for the plans (budgets and candidates)."""
        return max(*self.budgets, self.candidates)

    @property
    def headline_cache_fraction(self) -> float:
        """The swept fraction the report's main table shows (``headline_fraction`` as it stands in the sweep)."""
        return next(f for f in self.cache_fractions if math.isclose(f, self.headline_fraction))
