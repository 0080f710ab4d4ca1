"""Benchmark of the collect stage: tracing overhead, collection throughput, source-model quality.

    python benchmarks/collect_bench.py                         # random default-size model
    python benchmarks/collect_bench.py --workdir outputs/default   # the trained model + its training metrics

Speed is a ratio measured side by side in one run: bare forwards and traced forwards alternate, so machine
noise hits both equally; the median of the per-pair ratios is reported. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import timed  # benchmarks/timing.py: scripts run from this folder

from speculation.config import ModelConfig, RouterConfig
from speculation.health import RouterHealth
from speculation.models.source import load_source_model
from speculation.models.switch_lm import SwitchLM
from speculation.tokenizer import PAD_ID
from speculation.traces import SplitWriter
from speculation.tracing.collection import trace_split
from speculation.tracing.feeders import CausalFeeder, make_chunks
from speculation.tracing.recorder import RoutingRecorder
from speculation.workdir import METRICS_FILE, WEIGHTS_FILE, Workdir


def build_model(workdir: Path | None, device: torch.device) -> SwitchLM:
    if workdir is not None and (Workdir(workdir).source_model / WEIGHTS_FILE).exists():
        return load_source_model(Workdir(workdir).source_model, device)
    return SwitchLM(ModelConfig(), RouterConfig()).to(device).eval()


@torch.no_grad()
def tracing_overhead(model: SwitchLM, batch: int, seq_len: int, repeats: int, device: torch.device) -> dict:
    """Median ratio traced/bare forward time, for hooks alone and hooks + collect (mask, move to numpy)."""
    tokens = torch.randint(2, model.cfg.vocab_size, (batch, seq_len), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    recorder = RoutingRecorder(model)
    bare = lambda: model(tokens, mask)

    def hooks_only() -> None:
        model(tokens, mask)
        recorder._captures.clear()

    def hooks_and_collect() -> None:
        model(tokens, mask)
        recorder.collect(mask)

    for _ in range(3):  # warm-up
        bare()
    times: dict[str, list[float]] = {"bare": [], "hooks": [], "hooks+collect": []}
    for _ in range(repeats):
        times["bare"].append(timed(bare, device))
        recorder.attach()
        times["hooks"].append(timed(hooks_only, device))
        times["hooks+collect"].append(timed(hooks_and_collect, device))
        recorder.detach()
    bare_times = times["bare"]
    return {
        "bare_forward_ms": 1e3 * statistics.median(bare_times),
        **{
            f"{name}_overhead_pct": 100
            * (statistics.median(t / b for t, b in zip(times[name], bare_times, strict=True)) - 1)
            for name in ("hooks", "hooks+collect")
        },
        "tokens_per_forward": batch * seq_len,
    }


@torch.no_grad()
def collection_throughput(model: SwitchLM, tokens: int, seq_len: int, batch: int, device: torch.device) -> dict:
    """Tokens/s of the whole collect loop (forward, capture, fp16 cast, sha256, atomic shard writes)."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, model.cfg.vocab_size, size=4 * seq_len) for _ in range(tokens // (4 * seq_len) + 1)]
    chunks = make_chunks(documents, seq_len, tokens)
    with tempfile.TemporaryDirectory() as tmp, RoutingRecorder(model) as recorder:
        health = RouterHealth(recorder.layer_labels, model.cfg.num_experts)
        feeder = CausalFeeder(pad_id=PAD_ID, hf_style=False)
        start = time.perf_counter()
        trace_split(
            model, feeder, {"decoder": recorder}, {"decoder": SplitWriter(tmp, "bench")}, {"decoder": health},
            chunks, batch, 16, device,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    traced = sum(len(c.ids) for c in chunks)
    return {"tokens": traced, "seconds": elapsed, "tokens_per_s": traced / elapsed, "bytes_per_token": disk / traced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="a spec-collect workdir (uses its model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens for the throughput run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args.workdir, device)
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "model": {
            "parameters": model.num_parameters(),
            "moe_layers": len(model.moe_layers),
            "trained": args.workdir is not None,
        },
        "tracing_overhead": tracing_overhead(model, args.batch, args.seq_len, args.repeats, device),
        "collection": collection_throughput(model, args.tokens, args.seq_len, args.batch, device),
    }
    metrics_path = Workdir(args.workdir).source_model / METRICS_FILE if args.workdir else None
    if metrics_path is not None and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        results["source_model"] = {
            key: metrics[key]
            for key in ("train_time_s", "steps", "train_tokens", "val_loss", "unigram_val_loss", "device")
        }
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
