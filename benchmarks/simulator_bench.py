"""Benchmark: the prefetch simulator's throughput in layer-events per second (one event = one token at one MoE layer).

    python benchmarks/simulator_bench.py                              # synthetic top-1 traces, 6 layers x 8 experts
    python benchmarks/simulator_bench.py --workdir outputs/default    # a workdir's test split, oracle plan

Each (policy, eviction) is replayed ``--repeats`` times after a warm-up call (numba compiles on first use, and
caches the machine code on disk); the median is reported. The policies differ in how many copies (and so how many
eviction scans) they cause: on-demand issues only misses, the oracle plan a copy per non-resident target.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from speculation.cache import kernel
from speculation.cache.plans import Plan, no_plan, oracle_plan, source_layers
from speculation.cache.timing import TimingModel
from speculation.config.simulate import EVICTIONS, HardwareConfig, TargetConfig
from speculation.workdir import Workdir


def load_experts(args: argparse.Namespace) -> tuple[np.ndarray, int]:
    if args.workdir is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, args.experts, size=(args.tokens, args.layers, args.k)).astype(np.int32), args.experts
    from speculation.traces import TraceStore
    from speculation.traces.batches import first_rows

    store = TraceStore.open(Workdir(args.workdir).traces())
    rows = first_rows(store, "test", args.tokens)
    experts = store.split("test").rows(np.arange(rows.start, rows.stop), fields=["experts"])["experts"]
    return experts.astype(np.int32), store.num_experts


def noisy_candidates(experts: np.ndarray, num_experts: int, lookahead: int) -> Plan:
    """A multi-horizon candidate plan of 4 experts per (target, source): the true expert ranked first 80 % of the
    time, probabilities from a random Dirichlet draw sorted to match (what a decent predictor hands the policy)."""
    rng = np.random.default_rng(1)
    num_tokens, num_layers, _ = experts.shape
    sources = source_layers(num_layers, lookahead, multi_horizon=True)
    shape = (num_tokens, num_layers, sources.shape[1], 4)
    ranked = rng.integers(0, num_experts, size=shape).astype(np.int32)
    right = rng.random(shape[:3]) < 0.8
    ranked[..., 0] = np.where(right, experts[:, :, None, 0], ranked[..., 0])
    probs = -np.sort(-rng.dirichlet(np.ones(num_experts), size=shape[:3])[..., :4], axis=-1)
    return Plan(ranked, probs.astype(np.float32), sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    experts, num_experts = load_experts(args)
    num_tokens, num_layers, _ = experts.shape
    timing = TimingModel.from_profiles(HardwareConfig(), TargetConfig())
    capacity = max(round(args.fraction * num_layers * num_experts), experts.shape[2])
    plans = {
        "on_demand": (no_plan(experts), False),
        "oracle_d2": (oracle_plan(experts, 2), False),
        "cost_aware_multi_d2": (noisy_candidates(experts, num_experts, 2), True),
    }
    results = []
    for policy, (plan, cost_aware) in plans.items():
        for eviction in EVICTIONS:
            budget = 2 if cost_aware else plan.experts_TLHR.shape[3]
            run = kernel.PolicyRun(policy, "", eviction, budget, 2, plan, 1e-5, cost_aware=cost_aware)

            def replay(run=run):
                return kernel.replay(
                    experts_TLK=experts, num_experts=num_experts, run=run, capacity=capacity, timing=timing
                )

            started = time.perf_counter()
            replay()
            first = time.perf_counter() - started
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                replay()
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            rate = round(num_tokens * num_layers / median)
            results.append({"policy": policy, "eviction": eviction, "first_call_s": round(first, 3),
                            "median_s": round(median, 4), "layer_events_per_s": rate})  # fmt: skip
            print(json.dumps(results[-1]))
    rates = [r["layer_events_per_s"] for r in results]
    summary = {"tokens": num_tokens, "layers": num_layers, "experts": num_experts, "capacity": capacity,
               "min_layer_events_per_s": min(rates), "median_layer_events_per_s": statistics.median(rates)}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
