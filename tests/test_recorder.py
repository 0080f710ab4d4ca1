"""Hooks capture exactly what the model's own routers returned, for every router preset."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR, ROUTER_PRESETS
from omegaconf import OmegaConf

from speculation.config import ModelConfig, RouterConfig
from speculation.models.switch_lm import SwitchLM
from speculation.tracing.recorder import RoutingRecorder
from speculation.tracing.registry import ADAPTERS, find_adapter

TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=6, num_heads=2, d_ff=32, num_experts=4, max_seq_len=32)


def preset(name: str) -> RouterConfig:
    node = OmegaConf.merge(OmegaConf.structured(RouterConfig), OmegaConf.load(CONF_DIR / "router" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def batch_with_padding() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(2, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    return tokens, mask


@pytest.mark.parametrize("router_name", ROUTER_PRESETS)
def test_captures_equal_the_models_own_router_outputs(router_name):
    cfg = preset(router_name)
    if router_name == "capacity":
        cfg.capacity_factor = 0.5  # tight enough that this small batch really drops tokens
    model = SwitchLM(TINY, cfg).eval()
    tokens, mask = batch_with_padding()
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        out = model(tokens, mask)
        captured = recorder.collect(mask)
    num_real = int(mask.sum())
    assert captured["experts"].shape == (num_real, 3, cfg.max_experts_per_token)
    for layer, route in enumerate(out.routes):
        torch.testing.assert_close(
            torch.from_numpy(captured["logits"][:, layer]), route.logits_BTE[mask], rtol=0, atol=0
        )
        assert torch.equal(torch.from_numpy(captured["experts"][:, layer]), route.experts_BTK[mask])
        assert torch.equal(torch.from_numpy(captured["dropped"][:, layer]), route.dropped_BTK[mask])
        torch.testing.assert_close(torch.from_numpy(captured["gates"][:, layer]), route.gates_BTK[mask], rtol=0, atol=0)
        # The captured hidden state is the router's real input: scoring it again gives the same logits.
        router = model.routers[layer]
        hidden = torch.from_numpy(captured["hidden"][:, layer])[None]
        if cfg.span_length == 1:
            torch.testing.assert_close(router.scores(hidden)[0], route.logits_BTE[mask], rtol=1e-5, atol=1e-5)
    if router_name == "capacity":
        assert captured["dropped"].any() and (captured["experts"][captured["dropped"]] == -1).all()


def test_padding_never_reaches_the_trace():
    model = SwitchLM(TINY, RouterConfig()).eval()
    tokens, mask = batch_with_padding()
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(tokens, mask)
        captured = recorder.collect(mask)
        # Same real tokens alone, no padding at all: identical rows.
        model(tokens[0:1], mask[0:1])
        alone = recorder.collect(mask[0:1])
    assert captured["experts"].shape[0] == mask.sum()
    assert (captured["experts"][:12] == alone["experts"]).all()


def test_hidden_layer_selection_and_errors():
    model = SwitchLM(TINY, RouterConfig()).eval()
    tokens, mask = batch_with_padding()
    with torch.no_grad(), RoutingRecorder(model, hidden_sites=[2]) as recorder:
        model(tokens, mask)
        captured = recorder.collect(mask)
    assert captured["hidden"].shape == (mask.sum(), 1, 16)
    with RoutingRecorder(model, hidden_sites=[]) as recorder, torch.no_grad():
        model(tokens, mask)
        assert "hidden" not in recorder.collect(mask)
    with pytest.raises(ValueError, match=r"hidden layer indices \[7\]"):
        RoutingRecorder(model, hidden_sites=[7])


def test_hooks_are_removed_on_exit():
    model = SwitchLM(TINY, RouterConfig()).eval()
    with RoutingRecorder(model):
        assert all(len(r._forward_hooks) == 1 for r in model.routers)
    assert all(len(r._forward_hooks) == 0 for r in model.routers)


def test_unsupported_model_lists_supported_families():
    with pytest.raises(ValueError, match=r"supported families: .*embedded_switch"):
        find_adapter(torch.nn.Linear(2, 2))
    assert "embedded_switch" in ADAPTERS
