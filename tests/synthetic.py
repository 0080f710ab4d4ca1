"""A synthetic trace store for tests that need exact answers: random fp16-exact router inputs, routing that is a
known model's routers applied to them (or random logits), sequences of 50 tokens, 10 sequences per document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from speculation.config.model import ModelConfig, RouterConfig
from speculation.models.switch_lm import SwitchLM
from speculation.traces import SCHEMA_VERSION, SplitWriter, TraceStore, write_manifest
from speculation.tracing.collection import save_router_weights
from speculation.tracing.recorder import RoutingRecorder
from speculation.workdir import ROUTER_WEIGHTS_FILE

E, L, D_MODEL = 8, 4, 16  # experts, MoE layers, hidden width


def tiny_model() -> SwitchLM:
    cfg = ModelConfig(vocab_size=32, d_model=D_MODEL, num_layers=2 * L, num_heads=2, d_ff=32, num_experts=E)
    return SwitchLM(cfg, RouterConfig()).eval()


def synthetic_manifest(routing: dict | None = None, **sections: dict) -> dict:
    """A complete, schema-valid manifest (E experts, L layers unless ``routing`` says otherwise): ``routing``
    updates the routing section (the geometry follows its expert count and slots); any other section given
    replaces its default, ``model`` and ``geometry`` are updated."""
    routing = {"num_experts": E, "max_experts_per_token": 1, "layers": [f"decoder.{i}" for i in range(L)],
               "score": "softmax", **(routing or {})}  # fmt: skip
    layers = len(routing["layers"])
    manifest = {
        "stack": "decoder",
        "adapter": "embedded_switch",
        "model": {
            "kind": "embedded",
            "name": "synthetic",
            "weights_sha256": "synthetic-weights",
            "tokenizer_sha256": "synthetic-tokenizer",
            "config_sha256": "synthetic-config",
        },
        "geometry": {"d_model": D_MODEL, "d_ff": 32, "num_experts": routing["num_experts"],
                     "top_k": routing["max_experts_per_token"], "num_layers": 2 * layers,
                     "moe_layers": [2 * i + 1 for i in range(layers)], "dtype": "float32", "bytes_per_expert": 4096},
        "routing": routing,
        "hidden": {"layers": [], "size": 0},
        "router_weights": {"file": ROUTER_WEIGHTS_FILE, "format": "embedded_switch"},
        "splits": {},
        "schema_version": SCHEMA_VERSION,
    }  # fmt: skip
    for key, value in sections.items():
        manifest[key] = {**manifest[key], **value} if key in ("model", "geometry") else value
    return manifest


def write_store(root: Path, model: SwitchLM | None, num_tokens: int, seed: int = 0) -> TraceStore:
    """A store with train and test splits (the same rows); routing from ``model``'s routers, else random."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(num_tokens, L, D_MODEL)).astype(np.float16).astype(np.float32)
    if model is not None:
        with torch.no_grad():
            scores = [router.scores(torch.from_numpy(hidden[:, i])).numpy() for i, router in enumerate(model.routers)]
            logits = np.stack(scores, 1)
    else:
        logits = rng.normal(size=(num_tokens, L, E)).astype(np.float32)
    experts = logits.argmax(-1)[..., None]  # the router decides in float32; the store keeps float16 logits
    logits = logits.astype(np.float16)
    seq = np.arange(num_tokens) // 50
    arrays = {
        "experts": experts, "gates": np.ones_like(experts, dtype=np.float32), "logits": logits, "hidden": hidden,
        "token": np.zeros(num_tokens, dtype=np.int32), "doc": seq // 10, "pos": np.arange(num_tokens) % 50, "seq": seq,
    }  # fmt: skip
    splits = {}
    for split in ("train", "test"):
        writer = SplitWriter(root, split)
        writer.write_shard(0, arrays)
        splits[split] = writer.finalize(1)
    labels = RoutingRecorder(model).layer_labels if model is not None else [f"decoder.{i}" for i in range(L)]
    manifest = synthetic_manifest(
        routing={"layers": labels, "router_config": {"gate": "linear", "selection": "topk", "k": 1}},
        splits=splits,
        hidden={"layers": list(range(L)), "size": D_MODEL},
    )
    if model is not None:
        save_router_weights(RoutingRecorder(model), root / ROUTER_WEIGHTS_FILE)
    write_manifest(root, manifest)
    return TraceStore.open(root)
