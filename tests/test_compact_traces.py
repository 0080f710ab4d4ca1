"""Compact trace options (``trace.hidden_dtype``, ``trace.gate_lookahead``, ``trace.hidden_projection``): what the
store holds, that gate-lookahead scores the same from stored scores as from stored hidden states, and that a stage
needing a field the options dropped refuses with one clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_COLLECT, TINY_TRAIN, compose_config
from hf_tiny import FAMILIES, build_tiny
from safetensors.torch import load_file

from speculation.config import to_object
from speculation.config.collect import TraceConfig
from speculation.config.predictor import PredictorConfig
from speculation.config.stages import EvaluateConfig, PipelineConfig
from speculation.evaluation.runner import evaluate_predictors
from speculation.models.source import load_source_model
from speculation.predictors.gate_lookahead import (
    GateLookaheadPredictor,
    StoredGateLookaheadPredictor,
    gate_lookahead_for,
)
from speculation.predictors.loading import build_heuristics, load_trained_predictors
from speculation.predictors.routers import RouterBank
from speculation.predictors.training import check_store
from speculation.stages.collect import collect
from speculation.stages.evaluate import methods_for, open_traces
from speculation.stages.pipeline import check_at_start
from speculation.stages.train import train
from speculation.traces import SplitWriter, TraceStore
from speculation.traces.batches import load_batch
from speculation.traces.sizes import KNOWN_GEOMETRIES, TraceGeometry, bytes_per_token
from speculation.tracing.recorder import RoutingRecorder, random_projection
from speculation.tracing.registry import find_adapter
from speculation.workdir import PROJECTION_FILE, Workdir

NUM_LAYERS = 4  # the tiny smoke model's MoE layers


def collect_compact(collected: Path, target: Path, *options: str) -> Path:
    """``collected``'s model (its source_model copied, so nothing is retrained) traced with ``options``."""
    target.mkdir(parents=True)
    shutil.copytree(collected / "source_model", target / "source_model")
    collect(compose_config("collect", [*TINY_COLLECT, f"workdir={target}", *options]))
    return target


@pytest.fixture(scope="session")
def lookahead_bf16(collected, tmp_path_factory) -> Path:
    """Every layer's hidden state in bfloat16 and the gate-lookahead scores of D = 3: both paths on one store."""
    root = tmp_path_factory.mktemp("compact") / "lookahead"
    return collect_compact(collected, root, "trace.gate_lookahead=3", "trace.hidden_dtype=bfloat16")


@pytest.fixture(scope="session")
def projected(collected, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compact") / "projected"
    return collect_compact(collected, root, "trace.hidden_projection=8", "trace.projection_seed=5")


@pytest.fixture(scope="session")
def scores_only(collected, tmp_path_factory) -> Path:
    """No hidden states, gate-lookahead scores of D = 2 only."""
    root = tmp_path_factory.mktemp("compact") / "scores_only"
    return collect_compact(collected, root, "trace.save_hidden=false", "trace.gate_lookahead=2")


def whole_split(store: TraceStore, split: str = "test"):
    return load_batch(store, split, slice(0, store.split(split).num_rows))


def test_the_manifest_records_each_option_and_a_default_store_none(collected, lookahead_bf16, projected, scores_only):
    default = TraceStore.open(Workdir(collected).traces()).manifest
    assert "lookahead" not in default.raw and "projection" not in default.raw["hidden"]  # as before the options
    assert (default.hidden.dtype, default.hidden.projection, default.lookahead_depth) == ("float16", None, 0)
    assert set(default.raw["trace_config"]).isdisjoint({"hidden_dtype", "gate_lookahead", "hidden_projection"})
    compact = TraceStore.open(Workdir(lookahead_bf16).traces())
    assert compact.manifest.raw["dtypes"]["hidden"] == "bfloat16" and compact.manifest.hidden.dtype == "bfloat16"
    assert compact.manifest.raw["lookahead"] == {
        "depth": 3, "fill": 0.0, "field": "lookahead_logits",
        "source": "router l+d on the router input of l, rounded to bfloat16",
    }  # fmt: skip
    shard = Workdir(lookahead_bf16).traces() / "test" / "shard-00000"
    assert np.load(shard / "hidden.npy").dtype == np.uint16  # the raw bfloat16 bits
    assert compact.split("test").array("hidden").dtype == np.float32
    manifest = TraceStore.open(Workdir(projected).traces()).manifest
    assert manifest.raw["hidden"]["projection"] == {"width": 8, "input_size": 32, "seed": 5, "file": PROJECTION_FILE}
    assert manifest.hidden.size == 8 and manifest.raw["trace_config"]["hidden_projection"] == 8
    none = TraceStore.open(Workdir(scores_only).traces())
    assert none.manifest.hidden.layers == [] and none.split("test").fields[-5:] == (
        "lookahead_logits", "token", "doc", "pos", "seq",
    )  # fmt: skip


def test_the_stored_scores_are_the_routers_on_the_stored_hidden_states_rounded_to_float16(lookahead_bf16):
    store = TraceStore.open(Workdir(lookahead_bf16).traces())
    batch = whole_split(store)
    bank = RouterBank.from_store(store)  # the reference: routers rebuilt from their exported weights
    for layer in range(NUM_LAYERS):
        for j in range(3):
            stored_N_E = batch.lookahead_NLDE[:, layer, j]
            if layer + j + 1 >= NUM_LAYERS:
                assert not stored_N_E.any()  # the documented fill
                continue
            with torch.no_grad():
                scores = bank.scores(torch.from_numpy(batch.hidden_at(layer)), layer + j + 1).numpy()
            # bit for bit: both paths apply the same router to the same (bfloat16-rounded) input
            np.testing.assert_array_equal(stored_N_E, scores.astype(np.float16).astype(np.float32))


def test_gate_lookahead_scores_identically_from_stored_scores_and_from_hidden_states(lookahead_bf16):
    """Both paths score the routers' float16 scores (the test above: the same bits), so their predictions and every
    metric are identical, not merely close."""
    store = TraceStore.open(Workdir(lookahead_bf16).traces())
    batch = whole_split(store)
    from_hidden, from_scores = GateLookaheadPredictor.from_store(store), StoredGateLookaheadPredictor.from_store(store)
    for layer in range(NUM_LAYERS - 1):
        asked = from_scores.lookaheads_at(layer, NUM_LAYERS, 3)
        a, b = from_hidden.predict(batch, layer, asked), from_scores.predict(batch, layer, asked)
        # by hand: softmax of the stored float16 scores
        stored = batch.lookahead_NLDE[:, layer, [d - 1 for d in asked]].astype(np.float64)
        expected = np.exp(stored - stored.max(-1, keepdims=True))
        np.testing.assert_allclose(b.probs_NDE, expected / expected.sum(-1, keepdims=True), atol=1e-6)
        np.testing.assert_array_equal(a.probs_NDE, b.probs_NDE)
        np.testing.assert_array_equal(a.confidence_ND, b.confidence_ND)
    results = [
        evaluate_predictors(store, [method], split="test", max_lookahead=3, bootstrap=0)
        for method in (from_hidden, from_scores)
    ]
    assert results[0].rows
    pd.testing.assert_frame_equal(pd.DataFrame(results[0].rows), pd.DataFrame(results[1].rows), check_exact=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_routers_store_the_scores_gate_lookahead_computes(family: str) -> None:
    model = build_tiny(family)
    ids = torch.randint(2, 320, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    stack = "encoder" if family == "switch_transformers" else "decoder"  # the tiny Switch's decoder has one MoE layer
    recorder = RoutingRecorder(model, stack=stack, lookahead=1)
    inputs = {"input_ids": ids} | ({"decoder_input_ids": ids} if family == "switch_transformers" else {})
    with torch.no_grad(), recorder:
        model(**inputs)
        arrays = recorder.collect(mask)
    adapter = find_adapter(model)
    tensors = {f"{s.label}.{k}": v for s in recorder.sites for k, v in adapter.router_state(s).items()}
    routing = adapter.routing_meta(model)
    bank = RouterBank.from_parts(family, recorder.layer_labels, tensors, arrays["logits"].shape[-1], routing["score"])
    for layer in range(len(recorder.sites) - 1):
        hidden = torch.from_numpy(arrays["hidden"][:, layer]).half().float()  # as a float16 store holds it
        expected = bank.scores(hidden, layer + 1).numpy()
        np.testing.assert_allclose(arrays["lookahead_logits"][:, layer, 0], expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_states_round_to_nearest_even_and_overflow_is_refused(tmp_path) -> None:
    zeros = np.zeros(2, np.int64)
    rows = {"experts": np.zeros((2, 1, 1), np.int64), "gates": np.ones((2, 1, 1)), "logits": np.zeros((2, 1, 2)),
            "token": zeros, "doc": zeros, "pos": np.arange(2), "seq": zeros}  # fmt: skip
    # 1 + 2**-8 is halfway between bfloat16 neighbours 1 and 1 + 2**-7: ties go to the even one (1.0);
    # 1 + 3 * 2**-8 goes up to 1 + 2**-6; 70000 would overflow float16 but not bfloat16.
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 70000.0, -2.5], np.float32).reshape(2, 1, 2)
    writer = SplitWriter(tmp_path, "train", hidden_dtype="bfloat16")
    writer.write_shard(0, rows | {"hidden": values})
    stored = np.load(tmp_path / "train" / "shard-00000" / "hidden.npy")
    assert stored.dtype == np.uint16 and stored.reshape(-1).tolist() == [0x3F80, 0x3F82, 0x4789, 0xC020]
    with pytest.raises(ValueError, match=r"'hidden' has non-finite values or values beyond bfloat16 range"):
        writer.write_shard(1, rows | {"hidden": np.full((2, 1, 2), 3.4e38, np.float32)})
    with pytest.raises(ValueError, match=r"beyond float16 range \(±65504\)"):
        SplitWriter(tmp_path, "val").write_shard(0, rows | {"hidden": values})


def test_the_projection_is_the_saved_seeded_matrix_applied_to_the_routers_input(projected) -> None:
    store = TraceStore.open(Workdir(projected).traces())
    matrix = load_file(Workdir(projected).traces() / PROJECTION_FILE)["projection"]
    torch.testing.assert_close(matrix, random_projection(32, 8, seed=5), rtol=0, atol=0)
    split = store.split("val")
    rows = np.flatnonzero(split.array("seq") == split.array("seq")[0])
    tokens = torch.from_numpy(split.rows(rows)["token"].astype(np.int64))[None]
    model = load_source_model(Workdir(projected).source_model)
    with torch.no_grad(), RoutingRecorder(model) as recorder:  # unprojected, as a default store traces it
        model(tokens)
        raw = recorder.collect(torch.ones_like(tokens, dtype=torch.bool))["hidden"]
    expected = (torch.from_numpy(raw) @ matrix).numpy().astype(np.float16)
    np.testing.assert_allclose(split.rows(rows)["hidden"].astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_measured_bytes_per_token_equal_the_formula_for_every_option(lookahead_bf16, projected, scores_only):
    for workdir, lookahead, projection in ((lookahead_bf16, 3, None), (projected, 0, 8), (scores_only, 2, None)):
        store = TraceStore.open(Workdir(workdir).traces())
        split, manifest = store.split("test"), store.manifest
        measured = {f: sum(shard[f].nbytes for shard in split.shards) / split.num_rows for f in split.fields}
        geometry = TraceGeometry("smoke", manifest.num_layers, manifest.num_experts,
                                 manifest.routing.max_experts_per_token, 32)  # fmt: skip
        computed = bytes_per_token(geometry, len(manifest.hidden.layers), lookahead, projection)
        assert computed == {**measured, "total": sum(measured.values())}
    mixtral = next(g for g in KNOWN_GEOMETRIES if g.name == "mixtral-8x7b")
    # by hand: 848 B of routing (test_stage_collect.py); lookahead 32 x 3 x 8 x 2 B; projection 32 x 256 x 2 B
    assert bytes_per_token(mixtral, hidden_layers=0, lookahead=3)["total"] == 848 + 1536
    assert bytes_per_token(mixtral, projection=256)["total"] == 848 + 16_384


def test_a_store_without_hidden_states_refuses_learned_training_and_scores_gate_lookahead_from_its_scores(
    scores_only,
):
    overrides = [*TINY_COLLECT, *TINY_TRAIN, f"workdir={scores_only}", "predictor=probe"]
    with pytest.raises(ValueError, match=r"holds hidden states of MoE layers \[\], but learned predictors need all 4; "
                       r"re-collect with trace.save_hidden=true trace.hidden_layers=null\.$"):  # fmt: skip
        train(compose_config("train", overrides))
    assert not Workdir(scores_only).predictors.exists()
    cfg = to_object(compose_config("evaluate", ["logger=none", f"workdir={scores_only}"]), EvaluateConfig)
    store, cfg = open_traces(cfg)
    methods, skipped = methods_for(cfg, store)
    gate = next(m for m in methods if m.name == "gate_lookahead")
    assert isinstance(gate, StoredGateLookaheadPredictor) and gate.lookaheads_at(0, 4, 3) == [1, 2]
    fix = "re-collect with trace.gate_lookahead=3 (or with every layer's hidden state, unprojected, from which"
    assert skipped["gate_lookahead at d > 2"].endswith(f"{fix} gate_lookahead reaches any lookahead) to fill them.")


def test_a_projected_store_refuses_what_needs_the_real_hidden_state(projected, collected, tmp_path):
    store = TraceStore.open(Workdir(projected).traces())
    refusal = (
        r"^predictor.gate_lookahead=both applies the traced routers to the hidden states, but .* holds them randomly "
        r"projected to width 8 \(trace.hidden_projection=8\); train with predictor.gate_lookahead=none, or re-collect "
        r"with trace.hidden_projection=null\.$"
    )
    with pytest.raises(ValueError, match=refusal):
        check_store(store, PredictorConfig(gate_lookahead="both"))
    with pytest.raises(ValueError, match=r"gate_lookahead applies the traced routers .* projected to width 8 \(they "
                       r"were randomly projected\); .*or store the later routers' scores instead"):  # fmt: skip
        GateLookaheadPredictor.from_store(store)
    methods, skipped = build_heuristics(["oracle", "gate_lookahead"], store, seed=0)
    assert [m.name for m in methods] == ["oracle"] and "trace.gate_lookahead=3" in skipped["gate_lookahead"]
    assert gate_lookahead_for(store)[0] is None
    # a learned predictor without routers trains on the projected states, and is refused on unprojected traces
    work = tmp_path / "work"
    shutil.copytree(projected, work)
    overrides = [*TINY_COLLECT, *TINY_TRAIN, f"workdir={work}", "predictor=probe", "predictor.gate_lookahead=none"]
    train(compose_config("train", overrides))
    loaded, _ = load_trained_predictors(Workdir(work).predictors, TraceStore.open(Workdir(work).traces()))
    assert loaded[0].model.encoder.shape_LEH == (4, 8, 8)  # hidden width P = 8
    with pytest.raises(ValueError, match=r"was trained on hidden states projected to width 8 \(seed 5\), but .* "
                       r"holds them as traced; evaluate it on traces collected with the same"):  # fmt: skip
        load_trained_predictors(Workdir(work).predictors, TraceStore.open(Workdir(collected).traces()))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["trace.hidden_projection=8"], r"^predictor.gate_lookahead=both applies the traced routers"),
        (["trace.save_hidden=false"], r"holds hidden states of MoE layers \[\], but learned predictors need all 4"),
        (
            ["trace.gate_lookahead=4"],
            r"^trace.gate_lookahead=4 but model=.* has 4 MoE layers: .*set "
            r"trace.gate_lookahead=3\.$",
        ),
    ],
)
def test_spec_pipeline_refuses_traces_its_stages_cannot_use_at_start(options, message, tmp_path):
    cfg = to_object(compose_config("pipeline", [*TINY_COLLECT, f"workdir={tmp_path}", *options]), PipelineConfig)
    with pytest.raises(ValueError, match=message):
        check_at_start(cfg)
    assert not any(tmp_path.iterdir())  # before any work


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_dtype": "float32"}, r"trace.hidden_dtype='float32' is not one of float16, bfloat16\."),
        ({"gate_lookahead": 0}, r"trace.gate_lookahead=0 must be > 0\. Use null"),
        ({"hidden_projection": 0}, r"trace.hidden_projection=0 must be > 0\. Use null"),
        ({"hidden_projection": 4, "save_hidden": False}, r"trace.hidden_projection=4 projects the saved hidden states"),
        ({"projection_seed": -1}, r"trace.projection_seed=-1 must be a non-negative integer"),
    ],
)
def test_bad_trace_options_are_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        TraceConfig(**overrides)


def test_the_identity_names_a_compact_option_only_when_it_is_set():
    default = TraceConfig().identity()
    assert set(default) == {"seq_len", "batch_size", "batches_per_shard", "save_hidden", "hidden_layers",
                            "max_tokens_per_split"}  # fmt: skip
    assert TraceConfig(gate_lookahead=2, hidden_dtype="bfloat16").identity() == default | {
        "gate_lookahead": 2, "hidden_dtype": "bfloat16",
    }  # fmt: skip
