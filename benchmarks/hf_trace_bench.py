"""Benchmark of tracing HuggingFace MoEs: hook overhead and collection throughput.

    python benchmarks/hf_trace_bench.py              # tiny Switch/Mixtral overhead + switch-base-8 throughput
    python benchmarks/hf_trace_bench.py --skip-base  # overhead only (seconds instead of minutes)

Overhead is a ratio measured side by side: bare and traced forwards alternate, and the median of the per-pair
ratios is reported, so machine noise hits both. Throughput runs the real collect loop (both stacks of the
encoder-decoder, hidden states saved, fp16 cast, sha256, atomic shard writes) on a randomly initialised model of
switch-base-8's size: speed does not depend on the weights' values. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from speculation.health import RouterHealth
from speculation.traces import SplitWriter
from speculation.tracing.collection import trace_split
from speculation.tracing.feeders import CausalFeeder, Seq2SeqFeeder, make_chunks
from speculation.tracing.recorder import RoutingRecorder


def tiny_switch() -> torch.nn.Module:
    config = SwitchTransformersConfig(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4,
        num_experts=8, expert_capacity=64, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return SwitchTransformersForConditionalGeneration(config).eval()


def tiny_mixtral() -> torch.nn.Module:
    config = MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def feeder_for(model: torch.nn.Module) -> CausalFeeder | Seq2SeqFeeder:
    if model.config.is_encoder_decoder:
        return Seq2SeqFeeder(pad_id=0, decoder_start_id=0, encoder_fraction=0.5)
    return CausalFeeder(pad_id=0, hf_style=True)


def random_chunks(vocab: int, tokens: int, seq_len: int) -> list:
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, vocab, size=4 * seq_len) for _ in range(tokens // (4 * seq_len) + 1)]
    return make_chunks(documents, seq_len, tokens)


@torch.no_grad()
def overhead(model: torch.nn.Module, batch: int, seq_len: int, repeats: int) -> dict:
    """Median traced/bare time ratio of one batch through the feeder (hooks + collect vs no hooks)."""
    feeder = feeder_for(model)
    chunks = random_chunks(model.config.vocab_size, batch * seq_len, seq_len)[:batch]
    recorders = {stack: RoutingRecorder(model, stack=stack) for stack in feeder.stacks}

    def traced() -> None:
        for stack, (mask, _) in feeder(model, chunks, torch.device("cpu")).items():
            recorders[stack].collect(mask)

    def bare() -> None:
        feeder(model, chunks, torch.device("cpu"))

    for _ in range(3):
        bare()
    ratios, bare_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        bare()
        bare_times.append(time.perf_counter() - start)
        for recorder in recorders.values():
            recorder.attach()
        start = time.perf_counter()
        traced()
        ratios.append((time.perf_counter() - start) / bare_times[-1])
        for recorder in recorders.values():
            recorder.detach()
    return {
        "bare_forward_ms": 1e3 * statistics.median(bare_times),
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "tokens_per_forward": sum(len(c.ids) for c in chunks),
    }


@torch.no_grad()
def throughput(model: torch.nn.Module, tokens: int, seq_len: int, batch: int) -> dict:
    feeder = feeder_for(model)
    chunks = random_chunks(model.config.vocab_size, tokens, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        recorders = {stack: RoutingRecorder(model, stack=stack) for stack in feeder.stacks}
        writers = {stack: SplitWriter(f"{tmp}/{stack}", "bench") for stack in feeder.stacks}
        healths = {s: RouterHealth(r.layer_labels, model.config.num_experts) for s, r in recorders.items()}
        for recorder in recorders.values():
            recorder.attach()
        start = time.perf_counter()
        trace_split(model, feeder, recorders, writers, healths, chunks, batch, 4, torch.device("cpu"))
        elapsed = time.perf_counter() - start
    traced = sum(len(c.ids) for c in chunks)
    return {"tokens": traced, "seconds": elapsed, "tokens_per_s": traced / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--base-tokens", type=int, default=8192, help="tokens traced through switch-base-8 size")
    parser.add_argument("--skip-base", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "tracing_overhead": {
            "tiny_switch": overhead(tiny_switch(), args.batch, args.seq_len, args.repeats),
            "tiny_mixtral": overhead(tiny_mixtral(), args.batch, args.seq_len, args.repeats),
        },
    }
    if not args.skip_base:
        # google/switch-base-8's shape (its config.json): T5-base with 8 experts in every other layer of both stacks.
        base_config = SwitchTransformersConfig(
            d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, num_experts=8,
            num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, expert_capacity=64, vocab_size=32128,
            decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        base = SwitchTransformersForConditionalGeneration(base_config).eval()
        results["switch_base_8_random"] = {
            "parameters": sum(p.numel() for p in base.parameters()),
            **throughput(base, args.base_tokens, args.seq_len, args.batch),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
