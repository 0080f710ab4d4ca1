"""The evaluate stage: oracle and random on a large synthetic trace, gate-lookahead at d = 0, the stage's files,
and one clear error for each kind of bad request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_COLLECT, compose_config

from collect.main import collect
from evaluate.main import evaluate
from speculation.config import ModelConfig, RouterConfig
from speculation.evaluation.data import load_batch, sequence_blocks
from speculation.evaluation.runner import evaluate_predictors
from speculation.models.switch_lm import SwitchLM
from speculation.predictors import GateLookaheadPredictor, OraclePredictor, RandomPredictor
from speculation.traces import SplitWriter, TraceStore, write_manifest
from speculation.tracing.collection import save_router_weights
from speculation.tracing.recorder import RoutingRecorder

E, L, D_MODEL = 8, 4, 16


def write_store(root: Path, model: SwitchLM | None, num_tokens: int, seed: int = 0) -> TraceStore:
    """A synthetic store: random fp16-exact router inputs; routing = ``model``'s routers applied to them
    (or random logits without a model). Sequences of 50 tokens, 10 sequences per document."""
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
    manifest = {
        "model": {"kind": "embedded", "name": "synthetic"},
        "adapter": "embedded_switch",
        "geometry": {"d_model": D_MODEL, "num_experts": E},
        "routing": {
            "num_experts": E,
            "max_experts_per_token": 1,
            "layers": labels,
            "score": "softmax",
            "router_config": {"gate": "linear", "selection": "topk", "k": 1},
        },
        "hidden": {"layers": list(range(L)), "size": D_MODEL},
        "router_weights": {"file": "router_weights.safetensors", "format": "embedded_switch"},
        "splits": splits,
    }
    if model is not None:
        save_router_weights(RoutingRecorder(model), root / "router_weights.safetensors")
    write_manifest(root, manifest)
    return TraceStore.open(root)


def tiny_model() -> SwitchLM:
    cfg = ModelConfig(vocab_size=32, d_model=D_MODEL, num_layers=2 * L, num_heads=2, d_ff=32, num_experts=E)
    return SwitchLM(cfg, RouterConfig()).eval()


def test_oracle_scores_one_and_random_scores_one_over_e(tmp_path):
    store = write_store(tmp_path, None, num_tokens=30_000)
    result = evaluate_predictors(store, [OraclePredictor(), RandomPredictor(seed=0)], max_lookahead=2, bootstrap=50)
    rows = pd.DataFrame(result.rows)
    pooled = rows[rows["layer"] == "all"].set_index(["method", "lookahead"])
    for d in (1, 2):
        oracle = pooled.loc[("oracle", d)]
        assert oracle["top1_acc"] == 1.0 and oracle["recall_at_budget"] == 1.0 and oracle["exact_set"] == 1.0
        # KL is 0 except where float16 logits tie and the stored argmax is not the router's float32 choice.
        assert oracle["kl"] < 0.01 and oracle["ece"] == 0.0
        assert pooled.loc[("random", d), "top1_acc"] == pytest.approx(1 / E, abs=0.01)
        assert pooled.loc[("random", d), "recall_at_budget"] == pytest.approx(2 / E, abs=0.015)
    assert len(rows[rows["layer"] != "all"]) == 2 * (3 + 2)  # (l, d) pairs with l + d < L, per method
    assert result.tokens == 30_000


def test_gate_lookahead_at_d0_reproduces_the_routers_choices_exactly(tmp_path):
    store = write_store(tmp_path, tiny_model(), num_tokens=5_000)
    predictor = GateLookaheadPredictor.from_store(store)
    split = store.split("test")
    batch = load_batch(split, slice(0, split.num_rows), "softmax", hidden_layers=list(range(L)))
    for layer in range(L):
        choice = predictor.predict(batch, layer, [0]).probs_NDE[:, 0].argmax(-1)
        np.testing.assert_array_equal(choice, batch.experts_NLK[:, layer, 0])


def test_blocks_keep_sequences_whole():
    seq = np.repeat([0, 1, 2, 3], [3, 5, 2, 4])
    blocks = sequence_blocks(seq, max_rows=4)
    assert [(b.start, b.stop) for b in blocks] == [(0, 8), (8, 14)]
    for block in blocks:
        assert block.start == 0 or seq[block.start] != seq[block.start - 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_lookahead": 4}, r"max_lookahead=4 but the traces have 4 MoE layers"),
        ({"max_lookahead": 0}, r"lookahead d must be in 1..3"),
        ({"split": "val"}, r"eval.split='val' is not in"),
        ({"budget": 9}, r"prefetch_budget=9 must be in 1..8"),
    ],
)
def test_bad_requests_are_one_clear_error(tmp_path, kwargs, message):
    store = write_store(tmp_path, None, num_tokens=500)
    with pytest.raises(ValueError, match=message):
        evaluate_predictors(store, [OraclePredictor()], **kwargs)


def test_empty_split_is_one_clear_error(tmp_path):
    store = write_store(tmp_path, None, num_tokens=500)
    writer = SplitWriter(tmp_path, "val")
    empty = {name: values[:0] for name, values in store.split("test").rows(np.arange(1)).items()}
    writer.write_shard(0, empty)
    manifest = dict(store.manifest, splits={**store.manifest["splits"], "val": writer.finalize(1)})
    write_manifest(tmp_path, manifest)
    with pytest.raises(ValueError, match=r"split 'val' in .* has no tokens"):
        evaluate_predictors(TraceStore.open(tmp_path), [OraclePredictor()], split="val")


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("evaluate")
    overrides = [*TINY_COLLECT, f"workdir={workdir}", "trace.max_tokens_per_split=1500"]
    collect(compose_config("collect", overrides))
    return workdir


def test_spec_evaluate_writes_every_file(smoke_workdir):
    evaluate(compose_config("evaluate", [f"workdir={smoke_workdir}", "logger=none", "eval.bootstrap=100"]))
    eval_dir = smoke_workdir / "eval"
    frame = pd.read_csv(eval_dir / "metrics.csv")
    expected_methods = [
        "random", "frequency", "previous_token", "layer_minus_1", "multi_layer", "pattern", "adaptive",
        "gate_lookahead", "oracle",
    ]  # fmt: skip
    assert list(dict.fromkeys(frame["method"])) == expected_methods
    required = {"method", "lookahead", "layer", "top1_acc", "top1_ci_low", "top1_ci_high", "recall_at_budget"}
    assert required | {"exact_set", "f1", "kl", "ece", "brier", "conf_corr", "stability", "n_tokens"} <= set(frame)
    pooled = frame[frame["layer"] == "all"]
    assert sorted(pooled["lookahead"].unique()) == [1, 2, 3]
    assert (pooled["top1_ci_low"] <= pooled["top1_acc"]).all() and (pooled["top1_acc"] <= pooled["top1_ci_high"]).all()
    assert (pooled[pooled["method"] == "oracle"]["top1_acc"] == 1.0).all()
    summary = json.loads((eval_dir / "metrics.json").read_text())
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and "oracle/d1" in summary["reliability"]
    report = (eval_dir / "report.md").read_text()
    assert "## Lookahead d = 1" in report and "| gate_lookahead |" in report
    for name in ("accuracy_vs_lookahead.png", "reliability_d1.png", "layer_accuracy_d1.png"):
        assert (eval_dir / "figures" / name).stat().st_size > 0


def test_predictor_from_another_model_is_refused(smoke_workdir):
    run_dir = smoke_workdir / "predictors" / "contextual-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "predictor.json").write_text(json.dumps({"type": "contextual", "traces_fingerprint": "0" * 64}))
    try:
        with pytest.raises(ValueError, match="trained on traces of another model"):
            evaluate(compose_config("evaluate", [f"workdir={smoke_workdir}", "logger=none"]))
    finally:
        (run_dir / "predictor.json").unlink()


def test_traces_without_hidden_states_skip_gate_lookahead_and_say_why(tmp_path):
    store = write_store(tmp_path, None, num_tokens=500)
    manifest = dict(store.manifest, hidden={"layers": [], "size": 0})
    write_manifest(tmp_path, manifest)
    from speculation.evaluation.loading import build_heuristics

    methods, skipped = build_heuristics(["oracle", "gate_lookahead"], TraceStore.open(tmp_path), seed=0)
    assert [m.name for m in methods] == ["oracle"] and "trace.save_hidden=true" in skipped["gate_lookahead"]


def test_seeds_of_one_predictor_are_averaged_with_a_t_interval():
    from speculation.evaluation.report import COLUMNS, seed_means

    rows = []
    for method, accuracy in [("ctx-seed0", 0.5), ("ctx-seed1", 0.6), ("ctx-seed2", 0.7), ("solo", 0.1)]:
        row = dict.fromkeys(COLUMNS, 0.0)
        row.update(method=method, lookahead=1, layer="all", source_layer="all", target_layer="all", top1_acc=accuracy)
        rows.append(row)
    out = seed_means(pd.DataFrame(rows), {"ctx-seed0": "ctx", "ctx-seed1": "ctx", "ctx-seed2": "ctx", "solo": "solo"})
    mean = out[out["method"] == "ctx (3 seeds)"].iloc[0]
    half_width = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd of [0.5, 0.6, 0.7] = 0.1
    assert mean["top1_acc"] == pytest.approx(0.6)
    assert mean["top1_ci_low"] == pytest.approx(0.6 - half_width) and mean["top1_ci_high"] == pytest.approx(
        0.6 + half_width
    )
    assert not out["method"].str.startswith("solo (").any()  # a single run gets no seed row
