"""HF adapters: hook captures equal the model's own router outputs, selections match independent references.

Every family runs one right-padded batch under :class:`RoutingRecorder` (Switch: one recorder per stack, both
attached during the same forward). References never go through the adapter: router logits come from the model's
``output_router_logits``, selections from calling the router module again (after the hooks are gone) or, for
Switch, from re-applying argmax + per-sequence capacity to the returned logits.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from hf_tiny import FAMILIES, build_tiny, save_tiny
from torch import nn

from speculation.tracing.recorder import RoutingRecorder
from speculation.tracing.registry import ADAPTERS, find_adapter

BATCH, TIME = 2, 16
TOPK_FAMILIES = [f for f in FAMILIES if f != "switch_transformers"]


def right_padded_mask(lengths: list[int]) -> torch.Tensor:
    """[B, TIME] bool: the first ``lengths[b]`` positions of row b are real."""
    return torch.arange(TIME)[None, :] < torch.tensor(lengths)[:, None]


@dataclass
class Traced:
    model: nn.Module
    output: object
    recorders: dict[str, RoutingRecorder]  # by stack; detached
    records: dict[str, dict[str, np.ndarray]]  # by stack: what collect() returned
    masks: dict[str, torch.Tensor]  # by stack: [B, T] bool


def trace(model: nn.Module, ids_BT: torch.Tensor, masks: dict[str, torch.Tensor]) -> Traced:
    """One forward with a recorder per stack in ``masks``; returns the model output and the collected arrays."""
    recorders = {stack: RoutingRecorder(model, stack=stack) for stack in masks}
    for recorder in recorders.values():
        recorder.attach()
    try:
        inputs = {"input_ids": ids_BT, "attention_mask": masks.get("encoder", masks["decoder"]).long()}
        if "encoder" in masks:
            # A different token stream and mask for the decoder, so mixing up the two stacks would show.
            inputs |= {"decoder_input_ids": ids_BT.flip(1), "decoder_attention_mask": masks["decoder"].long()}
        with torch.no_grad():
            output = model(**inputs, output_router_logits=True)
        records = {stack: recorder.collect(masks[stack]) for stack, recorder in recorders.items()}
    finally:
        for recorder in recorders.values():
            recorder.detach()
    return Traced(model, output, recorders, records, masks)


def tiny_batch(family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids_BT = torch.randint(2, 320, (BATCH, TIME), generator=torch.Generator().manual_seed(1))
    if family == "switch_transformers":
        return ids_BT, {"encoder": right_padded_mask([TIME, 11]), "decoder": right_padded_mask([13, TIME])}
    return ids_BT, {"decoder": right_padded_mask([TIME, 11])}


@functools.cache
def traced_family(family: str) -> Traced:
    """One traced forward per family, shared by the tests that only read it."""
    ids_BT, masks = tiny_batch(family)
    return trace(build_tiny(family), ids_BT, masks)


@pytest.fixture(params=FAMILIES)
def traced(request: pytest.FixtureRequest) -> Traced:
    return traced_family(request.param)


@pytest.fixture(params=TOPK_FAMILIES)
def traced_topk(request: pytest.FixtureRequest) -> Traced:
    return traced_family(request.param)


def returned_logits(traced: Traced, stack: str) -> np.ndarray:
    """The model's own router logits of the real tokens: [N, L, E]."""
    out = traced.output
    per_layer = {"encoder": out.get("encoder_router_logits"), "decoder": out.get("decoder_router_logits")}[stack]
    per_layer = per_layer if per_layer is not None else out.router_logits  # decoder-only: [B*T, E] per layer
    num_experts = per_layer[0].shape[-1]
    logits_NLE = torch.stack([t.reshape(-1, num_experts) for t in per_layer], dim=1)
    return logits_NLE[traced.masks[stack].reshape(-1)].float().numpy()


def sort_by_gate(experts_NK: np.ndarray, gates_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest gate first, ties by lower expert id (the adapters' documented slot order)."""
    order = np.lexsort((experts_NK, -gates_NK), axis=-1)
    return np.take_along_axis(experts_NK, order, -1), np.take_along_axis(gates_NK, order, -1)


def test_captured_logits_are_the_models_router_logits_for_real_tokens_only(traced: Traced) -> None:
    for stack, record in traced.records.items():
        num_real = int(traced.masks[stack].sum())
        assert all(len(array) == num_real for array in record.values()), stack  # padding never recorded
        np.testing.assert_array_equal(record["logits"], returned_logits(traced, stack))
        assert record["hidden"].shape[1] == record["logits"].shape[1]  # every site keeps its router input


def test_captured_experts_are_what_the_router_selected(traced_topk: Traced) -> None:
    """Re-run each router module on the captured hidden states (hooks gone) and compare its selection."""
    traced = traced_topk
    record = traced.records["decoder"]
    differs_from_logit_topk = 0
    for index, site in enumerate(traced.recorders["decoder"].sites):
        with torch.no_grad():
            logits_NE, weights_NK, indices_NK = site.module(torch.from_numpy(record["hidden"][:, index]))
        experts_NK, gates_NK = sort_by_gate(indices_NK.numpy(), weights_NK.float().numpy())
        np.testing.assert_array_equal(record["experts"][:, index], experts_NK)
        np.testing.assert_allclose(record["gates"][:, index], gates_NK, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(record["logits"][:, index], logits_NE.float().numpy(), rtol=1e-5, atol=1e-5)
        assert not record["dropped"][:, index].any()
        top_k = experts_NK.shape[1]
        logit_topk_NK = np.sort(np.argsort(-record["logits"][:, index], axis=-1)[:, :top_k], axis=-1)
        differs_from_logit_topk += int((np.sort(experts_NK, axis=-1) != logit_topk_NK).any(axis=-1).sum())
    if traced.model.config.model_type == "deepseek_v3":
        # Sigmoid + correction bias + group limits: recording argmax-of-logits instead would fail above.
        assert differs_from_logit_topk > 0
    elif traced.model.config.model_type != "deepseek_v2":  # V2's group limit can also override the logits
        assert differs_from_logit_topk == 0


def test_switch_capacity_drops_match_argmax_plus_per_sequence_capacity() -> None:
    traced = traced_family("switch_transformers")
    masks, capacity = traced.masks, traced.model.config.expert_capacity
    total_dropped = 0
    for stack, per_layer in (
        ("encoder", traced.output.encoder_router_logits),
        ("decoder", traced.output.decoder_router_logits),
    ):
        record, keep_N = traced.records[stack], masks[stack].reshape(-1)
        sites = traced.recorders[stack].sites
        for index, logits_BTE in enumerate(per_layer):
            with torch.no_grad():  # the captured hidden state is what the router scored
                rescored_NE = sites[index].module.classifier(torch.from_numpy(record["hidden"][:, index]))
            np.testing.assert_allclose(record["logits"][:, index], rescored_NE.numpy(), rtol=1e-5, atol=1e-5)
            choice_BT = logits_BTE.argmax(-1)
            one_hot_BTE = nn.functional.one_hot(choice_BT, logits_BTE.shape[-1])
            priority_BT = (one_hot_BTE.cumsum(dim=1) * one_hot_BTE).sum(-1)  # rank among the row's tokens to the expert
            kept_N = (priority_BT <= capacity).reshape(-1)[keep_N]
            expected_N = torch.where(kept_N, choice_BT.reshape(-1)[keep_N], -1).numpy()
            gate_N = torch.where(kept_N, logits_BTE.softmax(-1).amax(-1).reshape(-1)[keep_N], 0).numpy()
            np.testing.assert_array_equal(record["experts"][:, index, 0], expected_N)
            np.testing.assert_array_equal(record["dropped"][:, index, 0], ~kept_N.numpy())
            np.testing.assert_allclose(record["gates"][:, index, 0], gate_N, rtol=1e-6)
            total_dropped += int((~kept_N).sum())
    assert total_dropped > 0, "the tiny Switch config must overflow capacity, or the drop check means nothing"


def reapply_router(state: dict[str, torch.Tensor], meta: dict, hidden_ND: torch.Tensor) -> tuple[np.ndarray, ...]:
    """A from-scratch top-k router driven only by ``router_state`` and ``routing_meta``: (experts, gates)."""
    logits_NE = hidden_ND @ state["weight"].T + state.get("bias", 0)
    scores_NE = logits_NE.sigmoid() if meta["score"] == "sigmoid" else logits_NE.softmax(-1)
    choice_NE = scores_NE + state.get("e_score_correction_bias", 0)
    if meta.get("topk_method") in ("group_limited_greedy", "noaux_tc"):
        groups_NGE = choice_NE.reshape(len(choice_NE), meta["n_group"], -1)
        if meta["group_score"] == "max":
            group_score_NG = groups_NGE.amax(-1)
        else:  # "top2_sum"
            group_score_NG = groups_NGE.topk(2, dim=-1).values.sum(-1)
        best_NG = group_score_NG.topk(meta["topk_group"], dim=-1).indices
        allowed_NG = torch.zeros_like(group_score_NG, dtype=torch.bool).scatter(1, best_NG, True)
        choice_NE = choice_NE.masked_fill(~allowed_NG.repeat_interleave(groups_NGE.shape[-1], dim=1), -torch.inf)
    experts_NK = choice_NE.topk(meta["top_k"], dim=-1).indices
    gates_NK = scores_NE.gather(1, experts_NK)
    if meta["norm_topk_prob"]:
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
    return sort_by_gate(experts_NK.numpy(), (gates_NK * meta["routed_scaling_factor"]).numpy())


def test_router_state_and_meta_are_enough_to_reapply_the_router(traced_topk: Traced) -> None:
    traced = traced_topk
    adapter, record = find_adapter(traced.model), traced.records["decoder"]
    meta = adapter.routing_meta(traced.model)
    json.dumps(meta)  # goes into the manifest
    for index, site in enumerate(traced.recorders["decoder"].sites):
        experts_NK, gates_NK = reapply_router(
            adapter.router_state(site), meta, torch.from_numpy(record["hidden"][:, index])
        )
        np.testing.assert_array_equal(record["experts"][:, index], experts_NK)
        np.testing.assert_allclose(record["gates"][:, index], gates_NK, rtol=1e-5, atol=1e-6)


def test_router_state_exports_every_routing_tensor() -> None:
    expected = {
        "switch_transformers": {"classifier.weight"},
        "deepseek_v3": {"weight", "e_score_correction_bias"},
        "gpt_oss": {"weight", "bias"},
        "mixtral": {"weight"},
    }
    for family, names in expected.items():
        model = build_tiny(family)
        adapter = find_adapter(model)
        state = adapter.router_state(adapter.sites(model)[0])
        assert set(state) == names, family
        assert all(t.device.type == "cpu" for t in state.values())


# Hand-computed: fp32 = 4 bytes; Switch has wi/wo [d, f], gated experts gate/up/down; GPT-OSS adds biases.
EXPECTED_GEOMETRY = {
    "switch_transformers": dict(d_model=32, d_ff=64, num_experts=4, top_k=1, num_layers=2, moe_layers=[1],
                                encoder_moe_layers=[0, 1], expert_matrices=2, bytes_per_expert=2 * 32 * 64 * 4),
    "mixtral": dict(d_model=32, d_ff=48, num_experts=4, top_k=2, moe_layers=[0, 1], bytes_per_expert=3 * 32 * 48 * 4),
    "qwen2_moe": dict(d_ff=24, num_experts=6, num_layers=3, moe_layers=[0, 2], bytes_per_expert=3 * 32 * 24 * 4,
                      shared_expert_bytes=3 * 32 * 40 * 4),
    "qwen3_moe": dict(d_ff=24, num_experts=8, moe_layers=[0, 1], bytes_per_expert=3 * 32 * 24 * 4),
    "olmoe": dict(d_ff=24, num_experts=8, moe_layers=[0, 1], bytes_per_expert=3 * 32 * 24 * 4),
    "deepseek_v2": dict(d_ff=24, num_layers=3, moe_layers=[1, 2], bytes_per_expert=3 * 32 * 24 * 4,
                        shared_expert_bytes=3 * 32 * 24 * 4),
    "deepseek_v3": dict(d_ff=24, num_layers=3, moe_layers=[1, 2], bytes_per_expert=3 * 32 * 24 * 4,
                        shared_expert_bytes=3 * 32 * 24 * 4),
    "gpt_oss": dict(d_ff=24, num_experts=4, moe_layers=[0, 1], bytes_per_expert=(3 * 32 * 24 + 2 * 24 + 32) * 4),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry(family: str) -> None:
    model = build_tiny(family)
    geometry = find_adapter(model).geometry(model)
    json.dumps(geometry)  # goes into the manifest
    assert geometry["model_type"] == family and geometry["dtype"] == "float32" and geometry["vocab_size"] == 320
    assert {k: geometry[k] for k in EXPECTED_GEOMETRY[family]} == EXPECTED_GEOMETRY[family]
    assert geometry.get("shared_expert_bytes") == EXPECTED_GEOMETRY[family].get("shared_expert_bytes", 0)


def test_switch_encoder_model_and_base_model_are_supported() -> None:
    from transformers import SwitchTransformersEncoderModel, SwitchTransformersModel

    config = build_tiny("switch_transformers").config
    encoder_only = SwitchTransformersEncoderModel(config).eval()
    adapter = find_adapter(encoder_only)
    assert [s.label for s in adapter.sites(encoder_only)] == ["encoder.0", "encoder.1"]
    assert adapter.geometry(encoder_only)["moe_layers"] == []
    base = SwitchTransformersModel(config).eval()
    assert [s.label for s in find_adapter(base).sites(base)] == ["encoder.0", "encoder.1", "decoder.1"]


def test_unsupported_model_fails_with_one_line_listing_families() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="supported families") as error:
        RoutingRecorder(LlamaForCausalLM(config))
    message = str(error.value)
    assert "\n" not in message and "LlamaForCausalLM" in message
    assert all(family in message for family in [*FAMILIES, "embedded_switch"])
    assert set(FAMILIES) <= set(ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_model_round_trips_offline_and_traces_identically(
    family: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env var is read at import
    directory = save_tiny(family, tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(directory).is_encoder_decoder else AutoModelForCausalLM
    loaded = auto.from_pretrained(directory).eval()

    texts = ["def add(a, b):\n    return a + b\n", "import os"]
    batch = tokenizer(texts, padding="max_length", max_length=TIME, truncation=True, return_tensors="pt")
    mask_BT = batch["attention_mask"].bool()
    assert tokenizer.pad_token_id == 0 and not mask_BT[1].all() and mask_BT[:, 0].all()  # right padding
    masks = {"encoder": mask_BT, "decoder": mask_BT} if family == "switch_transformers" else {"decoder": mask_BT}
    fresh, reloaded = trace(build_tiny(family), batch["input_ids"], masks), trace(loaded, batch["input_ids"], masks)
    for stack, record in fresh.records.items():
        assert record.keys() == reloaded.records[stack].keys()
        for name, array in record.items():
            np.testing.assert_array_equal(reloaded.records[stack][name], array, err_msg=f"{stack} {name}")
