"""The real prefetch engine (CUDA): the simulator's schedule executed with real copies and real expert FFNs.

The cache decisions are not re-implemented here: :func:`speculation.cache.kernel.replay` with ``record=True``
emits every copy (clock position, demand or prefetch, expert, GPU slot) and the slot every access reads, and the
engine executes exactly that, so hit/miss/prefetch counts are identical by construction and only time differs.

Execution per token and MoE layer, all enqueued without host synchronisation:

- compute stream: the layer's non-expert work (a dense stand-in of the target's size), then an event "router done";
- copy stream: waits for "router done" (a demand copy needs the router's choice; a prefetch needs the predictor,
  which runs at the router), waits for the slot's last-use event (never overwrite weights still being read), copies
  the expert from its pinned host buffer into the slot and records "slot ready";
- compute stream: waits for the "slot ready" of each expert the layer uses, runs their FFNs, records each slot's
  last use. Evicted experts are not written back (weights are read-only).

Per-token latency comes from CUDA events on the compute stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speculation.config.simulate import TargetConfig


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the prefetch engine needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine, "
            "or use the simulator (spec-evaluate), which needs none."
        )
    return torch.device("cuda")


@dataclass
class Schedule:
    """What the engine executes, from ``kernel.replay(..., record=True)``."""

    experts_TLK: np.ndarray  # the replayed routing (-1: unused slot)
    copies: np.ndarray  # [n, 4] clock position, kind (0 demand, 1 prefetch), layer · E + expert, GPU slot
    slot_TLK: np.ndarray  # GPU slot each access reads
    capacity: int

    def copies_at(self) -> dict[int, list[tuple[int, int]]]:
        """Clock position -> [(expert key, slot)] in issue order (demand copies before prefetches)."""
        grouped: dict[int, list[tuple[int, int]]] = {}
        for pos, _, key, slot in self.copies.tolist():
            grouped.setdefault(pos, []).append((key, slot))
        return grouped


class PrefetchEngine:
    """Experts of ``target``'s size for ``num_layers × num_experts`` (layer, expert) pairs in pinned host memory,
    ``capacity`` GPU slots allocated once, one copy stream."""

    def __init__(self, target: TargetConfig, num_layers: int, num_experts: int, capacity: int, seed: int = 0):
        self.device = require_cuda()
        self.target = target
        self.num_layers, self.num_experts = num_layers, num_experts
        d, f = target.d_model, target.d_ff
        generator = torch.Generator().manual_seed(seed)
        # one contiguous pinned buffer per expert: [expert_matrices, d, f] fp16 (wo stored transposed)
        self.host = [
            (torch.randn(target.expert_matrices, d, f, generator=generator) * 0.02).half().pin_memory()
            for _ in range(num_layers * num_experts)
        ]
        self.slots = torch.empty(capacity, target.expert_matrices, d, f, dtype=torch.float16, device=self.device)
        blocks = target.blocks_per_moe_layer
        self.attention = [torch.randn(d, 4 * d, device=self.device).half() * 0.02 for _ in range(blocks)]
        dense = target.dense_d_ff
        self.dense = [
            (torch.randn(d, dense, device=self.device).half() * 0.02, torch.randn(dense, d, device=self.device).half())
            for _ in range(blocks - 1 if dense else 0)
        ]
        self.router = torch.randn(d, num_experts, device=self.device).half()
        self.head = torch.randn(d, target.vocab_size, device=self.device).half() * 0.02
        self.copy_stream = torch.cuda.Stream()
        self.slot_ready = [torch.cuda.Event() for _ in range(capacity)]
        self.slot_free = [torch.cuda.Event() for _ in range(capacity)]

    def _non_expert(self, x: torch.Tensor) -> torch.Tensor:
        d = self.target.d_model
        for index, attention in enumerate(self.attention):  # q, k, v, o as one d × 4d stand-in per block
            x = torch.nn.functional.layer_norm(x, (d,))
            x = x + (x @ attention)[:, :d]
            if index < len(self.dense):
                wi, wo = self.dense[index]
                x = x + torch.relu(x @ wi) @ wo * 0.01
        _ = x @ self.router  # the router's matmul is part of the layer's work
        return x

    def _expert(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        weights = self.slots[slot]
        if self.target.expert_matrices == 3:  # SwiGLU: gate, up, down (down stored transposed)
            hidden = torch.nn.functional.silu(x @ weights[0]) * (x @ weights[1])
            return hidden @ weights[2].T
        return torch.relu(x @ weights[0]) @ weights[1].T

    @torch.no_grad()
    def run(self, schedule: Schedule, warmup_tokens: int = 8) -> np.ndarray:
        """Execute ``schedule``; the per-token latency in seconds (CUDA events, compute stream)."""
        compute = torch.cuda.current_stream()
        x = torch.randn(1, self.target.d_model, device=self.device).half()
        copies = schedule.copies_at()
        num_tokens, num_layers, slots = schedule.experts_TLK.shape
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tokens + 1)]
        for t in range(num_tokens):
            starts[t].record(compute)
            for layer in range(num_layers):
                pos = t * num_layers + layer
                x = self._non_expert(x)
                router_done = torch.cuda.Event()
                router_done.record(compute)
                for key, slot in copies.get(pos, []):
                    self.copy_stream.wait_event(router_done)
                    self.copy_stream.wait_event(self.slot_free[slot])
                    with torch.cuda.stream(self.copy_stream):
                        self.slots[slot].copy_(self.host[key], non_blocking=True)
                    self.slot_ready[slot].record(self.copy_stream)
                out = torch.zeros_like(x)
                for k in range(slots):
                    slot = int(schedule.slot_TLK[t, layer, k])
                    if schedule.experts_TLK[t, layer, k] < 0:
                        continue
                    compute.wait_event(self.slot_ready[slot])
                    out = out + self._expert(x, slot)
                    self.slot_free[slot].record(compute)
                x = x + out * 0.01
            (x @ self.head).argmax()
        starts[num_tokens].record(compute)
        torch.cuda.synchronize()
        seconds = np.array([starts[t].elapsed_time(starts[t + 1]) * 1e-3 for t in range(num_tokens)])
        return seconds[min(warmup_tokens, num_tokens - 1) :] if num_tokens > warmup_tokens else seconds
