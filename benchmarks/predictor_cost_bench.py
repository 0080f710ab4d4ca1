"""Benchmark: a learned predictor's cost per token per layer vs the MoE layer it serves, side by side.

    python benchmarks/predictor_cost_bench.py               # CPU, default predictor sizes (L = 6, E = 8, H = 128)
    python benchmarks/predictor_cost_bench.py --device cuda

One predictor forward covers every source layer of a window, so its cost per (token, layer) is the forward time
divided by B * T * L. It is compared with one MoE FFN layer's forward (router + top-1 expert) per token, for the
embedded model's layer (d 128, f 512) and for a switch-base-8-sized layer (d 768, f 3072). Forwards of the
predictor and the MoE layers alternate and the median of each is used. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from timing import timed  # benchmarks/timing.py: scripts run from this folder

from speculation.config import PredictorConfig, PredictorKind, RouterConfig
from speculation.models.switch_lm import MoEFeedForward
from speculation.predictors.learned import PredictorInputs, build_model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    num_layers, num_experts, hidden = 6, 8, 128
    batch, time_steps = args.batch, args.seq_len
    inputs = PredictorInputs(
        probs_BTLE=torch.softmax(torch.randn(batch, time_steps, num_layers, num_experts), -1).to(device),
        hidden_BTLH=torch.randn(batch, time_steps, num_layers, hidden).to(device),
        mask_BT=torch.ones(batch, time_steps, dtype=torch.bool, device=device),
    )
    moe_layers = {
        "embedded (d 128, f 512)": (MoEFeedForward(128, 512, 8, RouterConfig()), 128),
        "switch-base-8 (d 768, f 3072)": (MoEFeedForward(768, 3072, 8, RouterConfig()), 768),
    }
    results: dict = {"device": str(device), "tokens_per_forward": batch * time_steps, "predictors": {}}
    layer_seconds = {name: [] for name in moe_layers}
    for kind in PredictorKind:
        model = build_model(num_layers, num_experts, hidden, PredictorConfig(kind=kind)).to(device).eval()
        times = []
        for _ in range(args.repeats + 2):
            times.append(timed(lambda model=model: model(inputs), device))
            for name, (layer, width) in moe_layers.items():
                x = torch.randn(batch, time_steps, width, device=device)
                layer.to(device).eval()
                layer_seconds[name].append(timed(lambda layer=layer, x=x: layer(x), device))
        per_token_layer = statistics.median(times[2:]) / (batch * time_steps * num_layers)
        results["predictors"][str(kind)] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "us_per_token_per_layer": 1e6 * per_token_layer,
        }
    per_token_moe = {name: statistics.median(t[2:]) / (batch * time_steps) for name, t in layer_seconds.items()}
    results["moe_layer_us_per_token"] = {name: 1e6 * value for name, value in per_token_moe.items()}
    for entry in results["predictors"].values():
        entry["ratio_to_moe_layer_pct"] = {
            name: 100 * entry["us_per_token_per_layer"] / (1e6 * value) for name, value in per_token_moe.items()
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
