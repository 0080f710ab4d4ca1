"""Benchmark: a learned predictor's batch-1 decode cost per layer, where an inference engine pays it, side by side
with a switch-base-8-sized MoE layer (router + top-1 expert, d 768, f 3072) on the same device.

    python benchmarks/predictor_cost_bench.py --workdir outputs/default     # the workdir's trained runs
    python benchmarks/predictor_cost_bench.py                               # untrained default sizes (L 6, E 8, H 128)
    python benchmarks/predictor_cost_bench.py --gate-lookahead both         # ... with gate lookahead (random routers)
    python benchmarks/predictor_cost_bench.py --device cuda --out predictor_cost_cuda.json

Each predictor runs through :class:`speculation.predictors.inference.StreamingPredictor` (one ``step`` per token and
layer, state carried), over ``--tokens`` decode tokens; every step is timed alone (CUDA synchronised around it), and
the MoE layer is timed between steps, so both see the same machine state. Reported per predictor: the median and
mean step (the transformer's layer-0 step also runs its context encoder, so its mean exceeds its median), the
FLOPs of one step (``torch.utils.flop_counter``; matmuls only) against the MoE layer's, and the latency ratio.
The JSON it writes is the profile ``sim.predictor_profile`` reads: the simulator then charges each predictor its
measured mean step. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
from pathlib import Path

import torch
from timing import timed  # benchmarks/timing.py: scripts run from this folder
from torch.utils.flop_counter import FlopCounterMode

from speculation.config import PredictorConfig, PredictorKind, RouterConfig
from speculation.models.switch_lm import MoEFeedForward
from speculation.predictors.inference import StreamingPredictor
from speculation.predictors.learned import build_model, learned_parameters
from speculation.predictors.routers import random_bank
from speculation.workdir import PREDICTOR_FILE, Workdir


def predictors(workdir: str | None, gate_lookahead: str) -> dict[str, StreamingPredictor]:
    """One predictor per kind: the workdir's first finished run of each, or untrained default-sized models (with
    random routers when ``gate_lookahead`` uses them)."""
    if workdir is None:
        found = {}
        for kind in PredictorKind:
            cfg = PredictorConfig(kind=kind, gate_lookahead=gate_lookahead)
            routers = random_bank(6, 8, 128) if cfg.uses_routers else None
            found[str(kind)] = StreamingPredictor(build_model(6, 8, 128, cfg, routers))
        return found
    found: dict[str, StreamingPredictor] = {}  # by kind: what sim.predictor_profile looks a predictor up by
    for run_dir in sorted(Workdir(workdir).predictors.glob("*/")):
        if not (run_dir / PREDICTOR_FILE).is_file():
            continue  # unfinished
        kind = json.loads((run_dir / PREDICTOR_FILE).read_text())["kind"]
        if kind not in found:
            found[kind] = StreamingPredictor.load(run_dir)
    return found


def step_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (batch-1 work gains nothing more)")
    parser.add_argument("--out", default="predictor_cost.json")
    parser.add_argument("--gate-lookahead", default="none", help="untrained models: predictor.gate_lookahead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    moe = MoEFeedForward(768, 3072, 8, RouterConfig()).to(device).eval()
    x_11H = torch.randn(1, 1, 768, device=device)
    moe_flops = step_flops(lambda: moe(x_11H))
    results: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "tokens": args.tokens,
        "moe_layer": {"name": "switch-base-8 (d 768, f 3072, top-1)", "flops": moe_flops},
        "predictors": {},
    }
    moe_seconds = []
    for name, predictor in predictors(args.workdir, args.gate_lookahead).items():
        model = predictor.model.to(device)
        layers, experts, hidden = model.encoder.shape_LEH
        probs_TLE = torch.softmax(torch.randn(args.tokens, layers, experts), -1).to(device)
        hidden_TLH = torch.randn(args.tokens, layers, hidden).to(device)
        seconds, flops = [], []
        predictor.reset()
        for t in range(args.tokens):
            for layer in range(layers):
                step = functools.partial(predictor.step, layer, probs_TLE[t, layer], hidden_TLH[t, layer])
                if t == args.tokens // 2:  # count one token's steps mid-sequence, where the context is typical
                    flops.append(step_flops(step))
                else:
                    seconds.append(timed(step, device))
                moe_seconds.append(timed(lambda: moe(x_11H), device))
        warm = seconds[layers:]  # the first token's steps warm the allocator up
        results["predictors"][name] = {
            "parameters": learned_parameters(model.named_parameters()),
            "us_per_step_median": 1e6 * statistics.median(warm),
            "us_per_step_mean": 1e6 * statistics.fmean(warm),
            "flops_per_step": statistics.fmean(flops),
            "flops_pct_of_moe_layer": 100 * statistics.fmean(flops) / moe_flops,
        }
    moe_us = 1e6 * statistics.median(moe_seconds[len(moe_seconds) // 10 :])
    results["moe_layer"]["us_median"] = moe_us
    for entry in results["predictors"].values():
        entry["latency_pct_of_moe_layer"] = 100 * entry["us_per_step_mean"] / moe_us
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
