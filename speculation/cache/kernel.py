"""The simulator's event loop, compiled with numba (one decode stream, one GPU expert cache, one copy link).

Per token ``t`` and MoE layer ``l`` (clock position ``p = t·L + l``), in GPU-stream order:

1. the layer's non-expert work (attention, dense blocks, router) runs;
2. the router's choice is known: a needed expert already resident and arrived is a *hit*; resident but still in
   flight is *late* (the layer waits for it); absent is a *miss*, copied on demand (the layer waits for it);
3. if the policy prefetches, its predictor runs on a side stream (batch-1 decode leaves most SMs idle) and
   ``predictor_s`` later copies are issued for the target layers that layer ``l`` predicts (``sources_LH``), in
   rank order; an expert already resident or in flight is not copied again. A *fixed* plan copies every candidate;
   a *cost-aware* one decides per candidate (:func:`worth_copying`), up to ``budget`` copies per target layer;
4. the layer's experts run once every one of them has arrived (the wait is the *stall*).

Copies queue on one link in issue order (a copy starts when the link is free). Every copy takes a slot; when the
cache is full the eviction rule picks a victim among resident experts the current layer does not need. A slot being
copied into may be chosen as a victim: the link is FIFO, so the new copy cannot start before the old one ended.
Belady evicts the expert used farthest in the future and, knowing the future, skips a prefetch that would evict an
expert needed sooner than the prefetched one (the offline optimum's bypass).

Arrays of the cache's state are indexed by ``s = layer · E + expert``, one entry per (MoE layer, expert).

Shape legend (docs/glossary.md): T replayed tokens, L MoE layers, K expert slots, H source layers per target
layer, R candidate experts per (target, source).

:func:`replay` is the entry point: it takes a :class:`PolicyRun` (what to prefetch and how to evict) and returns
a :class:`Replay`; :func:`simulate` is the compiled loop behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from speculation.cache.plans import Plan
from speculation.cache.timing import TimingModel
from speculation.config.simulate import EVICTIONS

__all__ = ["EVICTION_CODES", "Counters", "PolicyRun", "Replay", "replay", "simulate", "worth_copying"]

# Eviction codes and the cache's bookkeeping. Every compiled function lives in this one file: numba's on-disk cache
# is keyed on the file of the function it compiles, so a callee edited in another file would leave stale machine
# code behind.
LRU, LFU, BELADY, PREDICTED, EXPECTED = 0, 1, 2, 3, 4
EVICTION_CODES = {name: code for code, name in enumerate(EVICTIONS)}  # the codes above, by sim.evictions name
assert EVICTION_CODES == {"lru": LRU, "lfu": LFU, "belady": BELADY, "predicted": PREDICTED, "expected": EXPECTED}
NEVER = np.iinfo(np.int64).max  # the next use of an expert that is never used again
REUSE_DECAY = 0.1  # weight of the latest token in an expert's usage rate (an exponential moving average)


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


@njit(cache=True, inline="always")
def expected_reuse(s, now_pos, predicted_for, reuse_state):
    """The probability that expert ``s`` is needed in one of the next two passes of its layer:
    ``1 - (1 - p_next) · (1 - u)``, with ``u`` its recent usage rate at its layer (``usage``, an exponential moving
    average) and ``p_next`` the chance it is needed at the next pass.

    While a prediction for its layer is pending (issued for a position after ``now_pos``), ``p_next`` is the
    predicted probability if ``s`` was among the candidates, else the mass the candidates left, shared evenly by the
    other experts; otherwise ``p_next = u``. (One pass alone is myopic: an expert certainly not needed at the next
    pass may be the one needed right after.) ``reuse_state``: (E, ``predicted_p``, ``layer_predicted_for``,
    ``layer_rest``, ``usage``), the arrays :func:`note_prediction` and the event loop keep.
    """
    num_experts, predicted_p, layer_predicted_for, layer_rest, usage = reuse_state
    layer = s // num_experts
    u = usage[s]
    p_next = u
    if layer_predicted_for[layer] > now_pos:
        p_next = predicted_p[s] if predicted_for[s] == layer_predicted_for[layer] else layer_rest[layer]
    return 1.0 - (1.0 - p_next) * (1.0 - u)


@njit(cache=True)
def note_prediction(experts_R, probs_R, layer, target_pos, reuse_state, predicted_for) -> None:
    """Remember a prediction for ``layer`` at clock position ``target_pos``: each candidate's probability (NaN,
    unknown, counts as certain) and, for the experts it did not list, the mass left over, shared evenly."""
    num_experts, predicted_p, layer_predicted_for, layer_rest, _ = reuse_state
    mass = 0.0
    listed = 0
    for r in range(experts_R.shape[0]):
        if experts_R[r] < 0:
            continue
        s = layer * num_experts + experts_R[r]
        predicted_for[s] = max(predicted_for[s], target_pos)
        predicted_p[s] = 1.0 if np.isnan(probs_R[r]) else probs_R[r]
        mass += predicted_p[s]
        listed += 1
    if listed:
        layer_predicted_for[layer] = target_pos
        layer_rest[layer] = max(0.0, 1.0 - mass) / max(1, num_experts - listed)


@njit(cache=True)
def victim(
    resident, pinned_at, now_pos, last_use, uses, next_access, predicted_for, unused, eviction, reuse_state
) -> int:
    """The slot to free under ``eviction``, or -1 when every resident expert is needed by the current layer.

    Except under Belady and expected reuse, a prefetched expert is protected until the layer it was fetched for has
    run (else LFU would evict every fresh prefetch, its use count being the lowest); ``predicted`` also protects
    resident experts a prediction expects. Protected experts go only when nothing else can. ``expected`` evicts the
    lowest :func:`expected_reuse`, ties by LRU.
    """
    best = -1
    best_reuse = 0.0
    best_protected = False
    for s in range(resident.shape[0]):
        if not resident[s] or pinned_at[s] == now_pos:
            continue
        protected = (
            eviction != BELADY
            and eviction != EXPECTED
            and predicted_for[s] > now_pos
            and (unused[s] or eviction == PREDICTED)
        )
        reuse = 0.0
        if eviction == EXPECTED:
            reuse = expected_reuse(s, now_pos, predicted_for, reuse_state)
        if best < 0 or (best_protected and not protected):
            best, best_reuse, best_protected = s, reuse, protected
            continue
        if protected and not best_protected:
            continue
        if eviction == LFU:
            better = uses[s] < uses[best] or (uses[s] == uses[best] and last_use[s] < last_use[best])
        elif eviction == BELADY:
            better = next_access[s] > next_access[best]
        elif eviction == EXPECTED:
            better = reuse < best_reuse or (reuse == best_reuse and last_use[s] < last_use[best])
        else:  # LRU, and PREDICTED among equally protected experts
            better = last_use[s] < last_use[best]
        if better:
            best, best_reuse = s, reuse
    return best


@njit(cache=True)
def place(s, evicted, occupied, resident, unused, slot_of) -> tuple[int, int]:
    """Make expert ``s`` resident in ``evicted``'s slot or, with ``evicted`` -1, in a free slot.

    Returns the new occupied count and 1 if the evicted expert was a prefetch never used (wasted), else 0.
    """
    wasted = 0
    if evicted >= 0:
        resident[evicted] = False
        wasted = 1 if unused[evicted] else 0
        slot_of[s] = slot_of[evicted]
        slot_of[evicted] = -1
    else:
        slot_of[s] = occupied
        occupied += 1
    resident[s] = True
    return occupied, wasted


@dataclass
class PolicyRun:
    """One replay's description: what a policy may prefetch (its :class:`~speculation.cache.plans.Plan`), whether it
    decides at issue time, and the eviction rule."""

    policy: str
    predictor: str  # the method whose predictions drive the plan ("" for on_demand and oracle)
    eviction: str
    budget: int  # most experts copied per target layer (0: none; the maximum for the confidence policy)
    lookahead: int  # the farthest source layer's distance (0: no prefetch)
    plan: Plan
    predictor_s: float  # the predictor's latency, which delays the copies it issues
    clairvoyant: bool = False  # the oracle: knows the future, so never prefetches at the cost of a sooner use
    cost_aware: bool = False  # decide each copy at issue time (worth_copying) instead of copying every candidate


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
        experts_TLK, run.plan.experts_TLHR, run.plan.sources_LH, num_experts, capacity, EVICTION_CODES[run.eviction],
        timing.copy_s, timing.non_expert_s, timing.expert_s, timing.head_s, run.predictor_s, record,
        run.clairvoyant, run.plan.probs_TLHR, run.cost_aware, run.budget,
    )  # fmt: skip
    hits, late, misses, prefetches, wasted, stall_s, compute_s = counters
    return Replay(
        token_s, Counters(int(hits), int(late), int(misses), int(prefetches), int(wasted), stall_s, compute_s),
        copies, slot_TLK,
    )  # fmt: skip


def simulate(
    experts_TLK: np.ndarray,
    plan: np.ndarray,
    sources: np.ndarray,
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
    probs: np.ndarray | None = None,
    cost_aware: bool = False,
    budget: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replay ``experts_TLK`` (-1 = unused slot) with candidates ``plan`` ([T, L, H, R], or [T, L, R] for one
    source per target) predicted at ``sources`` ([L, H], or [L]; -1 = none) with probabilities ``probs`` (None:
    unknown), as a :class:`~speculation.cache.plans.Plan` holds them. A fixed plan copies every candidate; with
    ``cost_aware``, each copy must be :func:`worth_copying`, at most ``budget`` per target layer and token.

    Returns the per-token latency [T] (seconds), counters ``[hits, late, misses, prefetches, wasted, stall_s,
    compute_s]`` (wasted: prefetched experts evicted, or left at the end, without being used), and with ``record``
    the schedule the real engine replays: ``copies`` [n, 4] = (clock position, kind 0 demand / 1 prefetch,
    layer · E + expert, GPU slot) in issue order, and ``slot_TLK``, the GPU slot each access reads (-1: none).
    The cache's decisions depend on clock positions only, never on times, for fixed plans; a cost-aware policy
    decides from the timing model too, and its recorded schedule is what the engine then executes.
    ``clairvoyant`` (the oracle) skips a prefetch whose victim is needed before the prefetched expert under any
    eviction rule, as Belady always does: knowing the future, it never trades a sooner use for a later one.
    """
    plan = np.asarray(plan, dtype=np.int32)
    plan = plan[:, :, None, :] if plan.ndim == 3 else plan
    sources = np.asarray(sources, dtype=np.int64)
    sources = sources[:, None] if sources.ndim == 1 else sources
    if probs is None:
        probs = np.full(plan.shape, np.nan, dtype=np.float32)
    probs = np.asarray(probs, dtype=np.float32)
    probs = probs[:, :, None, :] if probs.ndim == 3 else probs
    return _simulate(
        np.ascontiguousarray(experts_TLK, dtype=np.int32), np.ascontiguousarray(plan),
        np.ascontiguousarray(probs), np.ascontiguousarray(sources), num_experts, capacity, eviction, copy_s,
        non_expert_s, expert_s, head_s, predictor_s, record, clairvoyant, cost_aware,
        plan.shape[3] if budget is None or not cost_aware else budget,
    )  # fmt: skip


@njit(cache=True)
def worth_copying(p: float, issued: float, need: float, link_free: float, copy_s: float, busy: float,
                  victim_reuse: float) -> bool:  # fmt: skip
    """Whether copying a candidate expert now is expected to save more than it costs.

    The copy starts at ``max(issued, link_free)`` and arrives ``copy_s`` later; its layer needs it at ``need``.
    Right (probability ``p``), it saves the stall of the demand copy that would otherwise start at
    ``max(need, link_free)``. Wrong, it delays that demand copy by as much as it holds the link past ``need``, and
    at least by the link's busy share times one copy (the next copy, whoever issues it, waits behind it), and its
    victim is lost for nothing: the victim's probability of being needed again
    (:func:`expected_reuse`) times one copy. (Right, the demand copy would have evicted
    a victim too.) Ties go to the copy, so a certain prediction (``p = 1``) is always copied, as the oracle is.
    """
    if not p > 0:  # also NaN
        return False
    arrival = max(issued, link_free) + copy_s
    saved_if_right = max(need, link_free) + copy_s - max(need, arrival)
    delay_if_wrong = max(max(need, arrival) - max(need, link_free), busy * copy_s)
    return p * saved_if_right >= (1 - p) * (delay_if_wrong + victim_reuse * copy_s)


@njit(cache=True)
def _simulate(
    experts_TLK, plan_TLHR, probs_TLHR, sources_LH, num_experts, capacity, eviction, copy_s, non_expert_s, expert_s,
    head_s, predictor_s, record, clairvoyant, cost_aware, budget,
):  # fmt: skip
    num_tokens, num_layers, slots = experts_TLK.shape
    horizons, candidates = plan_TLHR.shape[2], plan_TLHR.shape[3]
    size = num_layers * num_experts
    resident = np.zeros(size, dtype=np.bool_)
    arrival = np.zeros(size, dtype=np.float64)
    last_use = np.full(size, -1, dtype=np.int64)
    uses = np.zeros(size, dtype=np.int64)
    pinned_at = np.full(size, -1, dtype=np.int64)
    predicted_for = np.full(size, -1, dtype=np.int64)  # the latest position a prediction expects s at
    predicted_p = np.zeros(size, dtype=np.float64)  # that prediction's probability
    layer_predicted_for = np.full(num_layers, -1, dtype=np.int64)
    layer_rest = np.zeros(num_layers, dtype=np.float64)  # per expert outside that prediction's candidates
    usage = np.zeros(size, dtype=np.float64)
    unused = np.zeros(size, dtype=np.bool_)
    slot_of = np.full(size, -1, dtype=np.int64)
    copied_for = np.zeros(num_layers, dtype=np.int64)  # the current token's copies per target layer
    most = num_tokens * num_layers * (slots + horizons * candidates) if record else 1
    copies = np.zeros((most, 4), dtype=np.int64)
    slot_TLK = np.full((num_tokens, num_layers, slots) if record else (1, 1, 1), -1, dtype=np.int64)
    count = 0
    following, next_access = next_uses(experts_TLK, num_experts)
    token_s = np.zeros(num_tokens, dtype=np.float64)
    hits = late = misses = prefetches = wasted = 0
    stall = compute = link_busy = 0.0
    occupied = 0
    gpu = link_free = 0.0
    prefetching = np.any(sources_LH >= 0)
    reuse_state = (num_experts, predicted_p, layer_predicted_for, layer_rest, usage)
    layer_s = non_expert_s + slots * expert_s  # the expected time of one layer, for a cost-aware copy's deadline
    for t in range(num_tokens):
        started = gpu
        copied_for[:] = 0
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
            for e in range(num_experts):  # the usage rate decays at every pass of its layer
                usage[layer * num_experts + e] *= 1.0 - REUSE_DECAY
            for k in range(slots):
                expert = experts_TLK[t, layer, k]
                if expert < 0:
                    continue
                s = layer * num_experts + expert
                computed += 1
                usage[s] += REUSE_DECAY
                if resident[s]:
                    if arrival[s] <= gpu:
                        hits += 1
                    else:
                        late += 1
                else:
                    misses += 1
                    evicted = -1
                    if occupied >= capacity:
                        evicted = victim(resident, pinned_at, pos, last_use, uses, next_access, predicted_for, unused,
                                         eviction, reuse_state)  # fmt: skip
                    occupied, lost = place(s, evicted, occupied, resident, unused, slot_of)
                    wasted += lost
                    if record:
                        copies[count] = (pos, 0, s, slot_of[s])
                        count += 1
                    arrival[s] = max(gpu, link_free) + copy_s
                    link_busy += copy_s
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
                layer_done = max(ready, gpu) + computed * expert_s
                for target in range(layer + 1, num_layers):
                    for h in range(horizons):
                        if sources_LH[target, h] != layer:
                            continue
                        target_pos = t * num_layers + target
                        need = layer_done + (target - layer - 1) * layer_s + non_expert_s
                        note_prediction(plan_TLHR[t, target, h], probs_TLHR[t, target, h], target, target_pos,
                                        reuse_state, predicted_for)  # fmt: skip
                        for r in range(candidates):
                            expert = plan_TLHR[t, target, h, r]
                            if expert < 0:
                                continue
                            s = target * num_experts + expert
                            if resident[s]:  # arrived or in flight: nothing to copy, and no budget spent
                                continue
                            if copied_for[target] >= budget:
                                break
                            p = probs_TLHR[t, target, h, r]
                            busy = 0.0
                            if cost_aware:
                                busy = min(1.0, link_busy / gpu) if gpu > 0 else 0.0
                                if not worth_copying(p, issued, need, link_free, copy_s, busy, 0.0):
                                    continue  # not worth it even with a free slot: spare the victim scan
                            evicted = -1
                            if occupied >= capacity:
                                evicted = victim(resident, pinned_at, pos, last_use, uses, next_access, predicted_for,
                                                 unused, eviction, reuse_state)  # fmt: skip
                                knows_future = clairvoyant or eviction == BELADY
                                if evicted < 0 or (knows_future and next_access[evicted] <= next_access[s]):
                                    continue  # nothing evictable, or (knowing the future) the victim is needed sooner
                                if cost_aware:
                                    lost_reuse = expected_reuse(evicted, pos, predicted_for, reuse_state)
                                    if not worth_copying(p, issued, need, link_free, copy_s, busy, lost_reuse):
                                        continue
                            occupied, lost = place(s, evicted, occupied, resident, unused, slot_of)
                            wasted += lost
                            if record:
                                copies[count] = (pos, 1, s, slot_of[s])
                                count += 1
                            arrival[s] = max(issued, link_free) + copy_s
                            link_busy += copy_s
                            link_free = arrival[s]
                            last_use[s] = pos  # an arrival counts as a use for LRU: a fresh prefetch is not the victim
                            unused[s] = True
                            prefetches += 1
                            copied_for[target] += 1
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
