"""The simulator's event loop, compiled with numba (one decode stream, one GPU expert cache, one copy link).

Per token ``t`` and MoE layer ``l`` (clock position ``p = t·L + l``), in GPU-stream order:

1. the layer's non-expert work (attention, dense blocks, router) runs;
2. the router's choice is known: a needed expert already resident and arrived is a *hit*; resident but still in
   flight is *late* (the layer waits for it); absent is a *miss*, copied on demand (the layer waits for it);
3. if the policy prefetches, its predictor runs on a side stream (batch-1 decode leaves most SMs idle) and
   ``predictor_s`` later copies are issued for the target layers whose prefetch is due at ``l``
   (``issue_layer_L``), in rank order; an expert already resident is not copied again;
4. the layer's experts run once every one of them has arrived (the wait is the *stall*).

Copies queue on one link in issue order (a copy starts when the link is free). Every copy takes a slot; when the
cache is full the eviction rule picks a victim among resident experts the current layer does not need. A slot being
copied into may be chosen as a victim: the link is FIFO, so the new copy cannot start before the old one ended.
Belady evicts the expert used farthest in the future and, knowing the future, skips a prefetch that would evict an
expert needed sooner than the prefetched one (the offline optimum's bypass).

Shape legend (docs/glossary.md): T replayed tokens, L MoE layers, K expert slots, R experts per prefetch.

:func:`replay` is the entry point: it takes a :class:`PolicyRun` (what to prefetch and how to evict) and returns
a :class:`Replay`; :func:`simulate` is the compiled loop behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from speculation.cache.timing import TimingModel
from speculation.config.simulate import EVICTIONS

LRU, LFU, BELADY, PREDICTED = 0, 1, 2, 3
EVICTION_CODES = {name: code for code, name in enumerate(EVICTIONS)}  # the codes above, by sim.evictions name
assert EVICTION_CODES == {"lru": LRU, "lfu": LFU, "belady": BELADY, "predicted": PREDICTED}
NEVER = np.iinfo(np.int64).max  # the next use of an expert that is never used again


@dataclass
class PolicyRun:
    """One replay's description: a prefetch plan under one eviction rule."""

    policy: str
    predictor: str  # the method whose predictions drive the plan ("" for on_demand and oracle)
    eviction: str
    budget: int  # experts prefetched per target layer (0: none; the maximum for the confidence policy)
    lookahead: int  # 0: no prefetch
    plan_TLR: np.ndarray  # experts to prefetch for token t's layer m (-1: none)
    issue_layer_L: np.ndarray  # the layer of the same token at which layer m's prefetch is issued (-1: never)
    predictor_s: float  # the predictor's latency, which delays the copies it issues
    clairvoyant: bool = False  # the oracle: knows the future, so never prefetches at the cost of a sooner use


@dataclass
class Counters:
    hits: int  # accesses whose expert was resident and had arrived
    late: int  # resident but still in flight: the layer waited for it
    misses: int  # copied on demand
    prefetches: int  # copies issued ahead of use
    wasted: int  # prefetched experts evicted (or left at the end) without a use
    stall_s: float  # time the GPU waited for copies
    compute_s: float  # time the GPU computed


@dataclass
class Replay:
    token_s: np.ndarray  # [T] seconds per token
    counters: Counters
    copies: np.ndarray  # with record: [n, 4] (clock position, 0 demand / 1 prefetch, layer · E + expert, slot)
    slot_TLK: np.ndarray  # with record: the GPU slot each access reads (-1: none)


def replay(
    *,
    experts_TLK: np.ndarray,
    num_experts: int,
    run: PolicyRun,
    capacity: int,
    timing: TimingModel,
    record: bool = False,
) -> Replay:
    """Replay ``experts_TLK`` (-1 = unused slot) under ``run`` with a cache of ``capacity`` expert slots."""
    assert capacity >= experts_TLK.shape[2], "the rules (speculation.config.rules) keep a layer's experts in the cache"
    token_s, counters, copies, slot_TLK = simulate(
        experts_TLK,
        np.ascontiguousarray(run.plan_TLR, dtype=np.int32),
        run.issue_layer_L,
        num_experts,
        capacity,
        EVICTION_CODES[run.eviction],
        timing.copy_s,
        timing.non_expert_s,
        timing.expert_s,
        timing.head_s,
        run.predictor_s,
        record,
        run.clairvoyant,
    )
    hits, late, misses, prefetches, wasted, stall_s, compute_s = counters
    return Replay(
        token_s, Counters(int(hits), int(late), int(misses), int(prefetches), int(wasted), stall_s, compute_s),
        copies, slot_TLK,
    )  # fmt: skip


@njit(cache=True)
def next_uses(experts_TLK: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """For every access, the clock position of the next access to the same (layer, expert); and the first ones."""
    num_tokens, num_layers, slots = experts_TLK.shape
    following = np.full((num_tokens, num_layers, slots), NEVER, dtype=np.int64)
    upcoming = np.full(num_layers * num_experts, NEVER, dtype=np.int64)
    for t in range(num_tokens - 1, -1, -1):
        for layer in range(num_layers - 1, -1, -1):
            for k in range(slots):
                expert = experts_TLK[t, layer, k]
                if expert < 0:
                    continue
                key = layer * num_experts + expert
                following[t, layer, k] = upcoming[key]
                upcoming[key] = t * num_layers + layer
    return following, upcoming


@njit(cache=True)
def _victim(resident, pinned_at, now_pos, last_use, uses, next_access, predicted_for, unused, eviction) -> int:
    """The slot to free under ``eviction``, or -1 when every resident expert is needed by the current layer.

    Except under Belady, a prefetched expert is protected until the layer it was fetched for has run (else LFU
    would evict every fresh prefetch, its use count being the lowest); ``predicted`` also protects resident
    experts a prediction expects. Protected experts go only when nothing else can.
    """
    best = -1
    best_protected = False
    for s in range(resident.shape[0]):
        if not resident[s] or pinned_at[s] == now_pos:
            continue
        protected = eviction != BELADY and predicted_for[s] > now_pos and (unused[s] or eviction == PREDICTED)
        if best < 0 or (best_protected and not protected):
            best, best_protected = s, protected
            continue
        if protected and not best_protected:
            continue
        if eviction == LFU:
            better = uses[s] < uses[best] or (uses[s] == uses[best] and last_use[s] < last_use[best])
        elif eviction == BELADY:
            better = next_access[s] > next_access[best]
        else:  # LRU, and PREDICTED among equally protected experts
            better = last_use[s] < last_use[best]
        if better:
            best = s
    return best


@njit(cache=True)
def _place(s, victim, occupied, resident, unused, slot_of) -> tuple[int, int]:
    """Make expert ``s`` resident in ``victim``'s slot (evicting it) or, with ``victim`` -1, in a free slot.

    Returns the new occupied count and 1 if the victim was a prefetch never used (wasted), else 0.
    """
    wasted = 0
    if victim >= 0:
        resident[victim] = False
        wasted = 1 if unused[victim] else 0
        slot_of[s] = slot_of[victim]
        slot_of[victim] = -1
    else:
        slot_of[s] = occupied
        occupied += 1
    resident[s] = True
    return occupied, wasted


@njit(cache=True)
def simulate(
    experts_TLK: np.ndarray,
    plan_TLR: np.ndarray,
    issue_layer_L: np.ndarray,
    num_experts: int,
    capacity: int,
    eviction: int,
    copy_s: float,
    non_expert_s: float,
    expert_s: float,
    head_s: float,
    predictor_s: float,
    record: bool = False,
    clairvoyant: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replay ``experts_TLK`` (-1 = unused slot) with prefetch plan ``plan_TLR`` (experts to prefetch for token t's
    layer m, issued at layer ``issue_layer_L[m]`` of the same token; -1 = none).

    Returns the per-token latency [T] (seconds), counters ``[hits, late, misses, prefetches, wasted, stall_s,
    compute_s]`` (wasted: prefetched experts evicted, or left at the end, without being used), and with ``record``
    the schedule the real engine replays: ``copies`` [n, 4] = (clock position, kind 0 demand / 1 prefetch,
    layer · E + expert, GPU slot) in issue order, and ``slot_TLK``, the GPU slot each access reads (-1: none).
    The cache's decisions depend on clock positions only, never on times, so the schedule is the same on any GPU.
    ``clairvoyant`` (the oracle) skips a prefetch whose victim is needed before the prefetched expert under any
    eviction rule, as Belady always does: knowing the future, it never trades a sooner use for a later one.
    """
    num_tokens, num_layers, slots = experts_TLK.shape
    budget = plan_TLR.shape[2]
    size = num_layers * num_experts
    resident = np.zeros(size, dtype=np.bool_)
    arrival = np.zeros(size, dtype=np.float64)
    last_use = np.full(size, -1, dtype=np.int64)
    uses = np.zeros(size, dtype=np.int64)
    pinned_at = np.full(size, -1, dtype=np.int64)
    predicted_for = np.full(size, -1, dtype=np.int64)
    unused = np.zeros(size, dtype=np.bool_)
    slot_of = np.full(size, -1, dtype=np.int64)
    most = num_tokens * num_layers * (slots + budget) if record else 1
    copies = np.zeros((most, 4), dtype=np.int64)
    slot_TLK = np.full((num_tokens, num_layers, slots) if record else (1, 1, 1), -1, dtype=np.int64)
    count = 0
    following, next_access = next_uses(experts_TLK, num_experts)
    token_s = np.zeros(num_tokens, dtype=np.float64)
    hits = late = misses = prefetches = wasted = 0
    stall = compute = 0.0
    occupied = 0
    gpu = link_free = 0.0
    prefetching = np.any(issue_layer_L >= 0)
    for t in range(num_tokens):
        started = gpu
        for layer in range(num_layers):
            pos = t * num_layers + layer
            gpu += non_expert_s
            compute += non_expert_s
            ready = gpu
            computed = 0
            for k in range(slots):  # pin first: none of this layer's experts may be evicted for another
                expert = experts_TLK[t, layer, k]
                if expert >= 0:
                    pinned_at[layer * num_experts + expert] = pos
            for k in range(slots):
                expert = experts_TLK[t, layer, k]
                if expert < 0:
                    continue
                s = layer * num_experts + expert
                computed += 1
                if resident[s]:
                    if arrival[s] <= gpu:
                        hits += 1
                    else:
                        late += 1
                else:
                    misses += 1
                    victim = -1
                    if occupied >= capacity:
                        victim = _victim(
                            resident, pinned_at, pos, last_use, uses, next_access, predicted_for, unused, eviction
                        )
                    occupied, lost = _place(s, victim, occupied, resident, unused, slot_of)
                    wasted += lost
                    if record:
                        copies[count] = (pos, 0, s, slot_of[s])
                        count += 1
                    arrival[s] = max(gpu, link_free) + copy_s
                    link_free = arrival[s]
                ready = max(ready, arrival[s])
                if record:
                    slot_TLK[t, layer, k] = slot_of[s]
                last_use[s] = pos
                uses[s] += 1
                unused[s] = False
                next_access[s] = following[t, layer, k]
            if prefetching and layer < num_layers - 1:
                issued = gpu + predictor_s  # the predictor runs on a side stream: it delays the copies, not the layer
                for target in range(layer + 1, num_layers):
                    if issue_layer_L[target] != layer:
                        continue
                    for b in range(budget):
                        expert = plan_TLR[t, target, b]
                        if expert < 0:
                            continue
                        s = target * num_experts + expert
                        predicted_for[s] = max(predicted_for[s], t * num_layers + target)
                        if resident[s]:
                            continue
                        victim = -1
                        if occupied >= capacity:
                            victim = _victim(
                                resident, pinned_at, pos, last_use, uses, next_access, predicted_for, unused, eviction
                            )
                            knows_future = clairvoyant or eviction == BELADY
                            if victim < 0 or (knows_future and next_access[victim] <= next_access[s]):
                                continue  # nothing evictable, or (knowing the future) the victim is needed sooner
                        occupied, lost = _place(s, victim, occupied, resident, unused, slot_of)
                        wasted += lost
                        if record:
                            copies[count] = (pos, 1, s, slot_of[s])
                            count += 1
                        arrival[s] = max(issued, link_free) + copy_s
                        link_free = arrival[s]
                        last_use[s] = pos  # an arrival counts as a use for LRU: a fresh prefetch is not the victim
                        unused[s] = True
                        prefetches += 1
            if ready > gpu:
                stall += ready - gpu
                gpu = ready
            gpu += computed * expert_s
            compute += computed * expert_s
        gpu += head_s
        compute += head_s
        token_s[t] = gpu - started
    for s in range(size):
        wasted += resident[s] and unused[s]
    counters = np.array([hits, late, misses, prefetches, wasted, stall, compute], dtype=np.float64)
    return token_s, counters, copies[:count], slot_TLK
