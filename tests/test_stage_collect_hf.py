"""The collect stage with ``model=hf``, offline, on a tiny saved checkpoint of every supported family.

The stored traces must be what the model itself reports: logits equal to its ``output_router_logits`` (up to the
store's float16) and experts equal to an independent re-derivation of what its routers selected.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from hf_tiny import FAMILIES, save_tiny
from safetensors.torch import load_file

from speculation.config.model import ModelConfig, ModelKind
from speculation.models.hf import hf_skeleton, load_hf_model
from speculation.stages.collect import collect
from speculation.traces import TraceStore
from speculation.tracing.registry import stack_geometry

# Families whose selection is plain top-k of the logits. Switch (capacity) and DeepSeek (group limits, V3's
# biased sigmoid) are checked against re-derivations of their own rules in test_hf_adapters.py.
PLAIN_TOP_K = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}

OVERRIDES = [
    "model=hf",
    "logger=none",
    "corpus.max_documents=30",
    "corpus.max_document_chars=3000",
    "corpus.val_fraction=0.2",
    "corpus.test_fraction=0.2",
    "trace.seq_len=24",
    "trace.batch_size=4",
    "trace.batches_per_shard=2",
    "trace.max_tokens_per_split=300",
]


@pytest.fixture(scope="module", params=FAMILIES)
def collected(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    checkpoint = save_tiny(family, root / "checkpoint")
    collect(compose_config("collect", [*OVERRIDES, f"model.path={checkpoint}", f"workdir={root / 'work'}"]))
    return family, checkpoint, root / "work"


def test_trace_store_matches_the_models_own_router_outputs(collected):
    family, checkpoint, workdir = collected
    model, _ = load_hf_model(ModelConfig(kind=ModelKind.hf, path=str(checkpoint)), torch.device("cpu"))
    store = TraceStore.open(workdir / "traces")
    assert store.manifest.adapter == family and store.manifest.stack == "decoder"
    split = store.split("test")
    seq = split.array("seq")
    rows = split.rows(np.flatnonzero(seq == seq[0]))
    tokens = torch.from_numpy(rows["token"].astype(np.int64))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            encoder = TraceStore.open(workdir / "traces" / "encoder").split("test")
            enc_rows = encoder.rows(np.flatnonzero(encoder.array("seq") == seq[0]))
            out = model(
                input_ids=torch.from_numpy(enc_rows["token"].astype(np.int64))[None],
                decoder_input_ids=tokens[None],
                output_router_logits=True,
            )
            reference = {"decoder": out.decoder_router_logits, "encoder": out.encoder_router_logits}
            stored = {"decoder": rows, "encoder": enc_rows}
        else:
            out = model(input_ids=tokens[None], output_router_logits=True)
            reference, stored = {"decoder": out.router_logits}, {"decoder": rows}
    for stack, logits_per_layer in reference.items():
        for layer, logits in enumerate(logits_per_layer):
            expected = logits.reshape(-1, logits.shape[-1]).float().numpy()
            np.testing.assert_allclose(stored[stack]["logits"][:, layer], expected.astype(np.float16), rtol=0, atol=0)
            if family in PLAIN_TOP_K:
                # No capacity, groups or score bias: the selected set is the top-k of the logits.
                k = stored[stack]["experts"].shape[-1]
                top = np.sort(np.argsort(-expected, axis=-1, kind="stable")[:, :k], axis=-1)
                np.testing.assert_array_equal(np.sort(stored[stack]["experts"][:, layer], axis=-1), top)
            if family == "switch_transformers":
                # Top-1 with per-sequence capacity: the n-th token choosing an expert is kept iff n <= capacity.
                choice = expected.argmax(-1)
                arrival = np.cumsum(np.eye(expected.shape[-1], dtype=int)[choice], axis=0)[
                    np.arange(len(choice)), choice
                ]
                capacity = store.manifest.raw["routing"]["expert_capacity"]
                selected = np.where(arrival <= capacity, choice, -1)
                np.testing.assert_array_equal(stored[stack]["experts"][:, layer, 0], selected)


def test_the_skeleton_knows_the_traced_geometry_before_any_weight_is_read(collected):
    # What spec-pipeline checks its lookaheads and cache fractions against at start equals the manifest's sizes.
    family, checkpoint, workdir = collected
    skeleton = hf_skeleton(ModelConfig(kind=ModelKind.hf, path=str(checkpoint)))
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert stack_geometry(skeleton, "decoder") == TraceStore.open(workdir / "traces").manifest.sizes
    if family == "switch_transformers":
        assert stack_geometry(skeleton, "encoder") == TraceStore.open(workdir / "traces" / "encoder").manifest.sizes
    else:
        assert stack_geometry(skeleton, "encoder") is None


def test_manifest_records_geometry_and_router_parameters(collected):
    _, _, workdir = collected
    manifest = json.loads((workdir / "traces" / "manifest.json").read_text())
    geometry = manifest["geometry"]
    assert geometry["num_experts"] >= 4 and geometry["bytes_per_expert"] > 0 and geometry["moe_layers"]
    assert manifest["routing"]["layers"] == [f"decoder.{layer}" for layer in geometry["moe_layers"]]
    assert manifest["source_metrics"] is None and manifest["model"]["kind"] == "hf"
    from safetensors.torch import load_file

    weights = load_file(workdir / "traces" / "router_weights.safetensors")
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in weights} == set(manifest["routing"]["layers"])


def test_switch_records_drops_and_both_stacks(tmp_path):
    checkpoint = save_tiny("switch_transformers", tmp_path / "checkpoint")
    collect(compose_config("collect", [*OVERRIDES, f"model.path={checkpoint}", f"workdir={tmp_path / 'work'}"]))
    decoder = TraceStore.open(tmp_path / "work" / "traces")
    encoder = TraceStore.open(tmp_path / "work" / "traces" / "encoder")
    assert decoder.manifest.raw["other_stacks"] == {"encoder": "encoder"}
    assert encoder.manifest.raw["other_stacks"] == {"decoder": ".."} and encoder.manifest.stack == "encoder"
    assert all(name.startswith("encoder.") for name in encoder.layer_names)
    for store in (decoder, encoder):
        split = store.split("train")
        experts, dropped = split.array("experts"), split.array("dropped")
        assert dropped.any(), "the tiny Switch's small capacity must drop some tokens"
        assert (experts[dropped] == -1).all() and (experts[~dropped] >= 0).all()
    # Teacher forcing: each decoder sequence starts with the decoder start token (pad id 0 for T5-style models).
    dec_split = decoder.split("train")
    seq, token = dec_split.array("seq"), dec_split.array("token")
    starts = np.flatnonzero(np.diff(seq, prepend=-1))
    assert (token[starts] == 0).all()


def test_unsupported_model_is_one_line_listing_families(tmp_path):
    from hf_tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    ).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    with pytest.raises(ValueError, match=r"not a supported MoE model; supported families: .*mixtral") as err:
        collect(compose_config("collect", [*OVERRIDES, f"model.path={directory}", f"workdir={tmp_path / 'work'}"]))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "work" / "traces" / "manifest.json").exists()


MIXTRAL_WITH_A_LAYER_ON_DISK = ("{model.embed_tokens:cpu,model.layers.0:cpu,model.layers.1:disk,model.norm:cpu,"
                                "model.rotary_emb:cpu,lm_head:cpu}")  # fmt: skip


def test_a_device_mapped_checkpoint_traces_exactly_as_a_single_device_one(tmp_path):
    # Accelerate places layer 1 on disk: its weights are meta tensors between forward passes, loaded by hooks for
    # each one; the traces (every shard's sha256) and the exported router weights must not notice.
    checkpoint = save_tiny("mixtral", tmp_path / "checkpoint")
    stores = {}
    for name, placement in (("plain", []), ("mapped", [f"model.device_map={MIXTRAL_WITH_A_LAYER_ON_DISK}",
                                                       f"model.offload_folder={tmp_path / 'offload'}"])):  # fmt: skip
        workdir = tmp_path / name
        collect(compose_config("collect", [*OVERRIDES, f"model.path={checkpoint}", f"workdir={workdir}", *placement]))
        stores[name] = TraceStore.open(workdir / "traces")
    assert any((tmp_path / "offload").iterdir())  # the layer really went to disk
    shards = {name: {split: [s["sha256"] for s in info["shards"]] for split, info in store.manifest.splits.items()}
              for name, store in stores.items()}  # fmt: skip
    assert shards["plain"] == shards["mapped"] and shards["plain"]["test"]
    weights = [load_file(tmp_path / name / "traces" / "router_weights.safetensors") for name in ("plain", "mapped")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_placement_keys_reach_from_pretrained_and_are_refused_for_the_embedded_model():
    cfg = ModelConfig(kind=ModelKind.hf, path="x", device_map={"model.layers.0": "0", "lm_head": "cpu"},
                      max_memory={"0": "20GiB", "cpu": "64GiB"})  # fmt: skip
    assert cfg.placement == {"device_map": {"model.layers.0": 0, "lm_head": "cpu"},
                             "max_memory": {0: "20GiB", "cpu": "64GiB"}}  # fmt: skip
    assert ModelConfig(kind=ModelKind.hf, path="x").placement == {}  # load whole, then .to(device)
    with pytest.raises(ValueError, match=r"model.device_map apply to model=hf checkpoints"):
        ModelConfig(device_map="auto")
    with pytest.raises(ValueError, match=r"model.device_map='everywhere' is not one of auto, balanced"):
        ModelConfig(kind=ModelKind.hf, path="x", device_map="everywhere")
    with pytest.raises(ValueError, match=r"puts layers on disk; set model.offload_folder"):
        ModelConfig(kind=ModelKind.hf, path="x", device_map={"lm_head": "disk"})
    with pytest.raises(ValueError, match=r"model.max_memory=.* needs model.device_map"):
        ModelConfig(kind=ModelKind.hf, path="x", max_memory={"0": "1GiB"})
