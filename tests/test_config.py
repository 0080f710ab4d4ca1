"""Hydra composition and config validation: bad values fail at start with one clear message."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, ROUTER_PRESETS, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from speculation.config import CollectConfig, Gate, PipelineConfig, to_object
from speculation.config.stages import EvaluateConfig, TrainConfig, default_run_name


@pytest.mark.parametrize("router", ROUTER_PRESETS)
def test_every_router_preset_composes_and_validates(router):
    cfg = to_object(compose_config("collect", [f"router={router}"]), CollectConfig)
    assert cfg.router.max_experts_per_token <= cfg.model.num_experts


def test_every_router_preset_has_a_label_of_its_own():
    """W&B tags and tables tell routers apart by their label (not by gate and selection, which five presets share)."""
    labels = {
        p: to_object(compose_config("collect", [f"router={p}"]), CollectConfig).router.label for p in ROUTER_PRESETS
    }
    assert labels == {
        "adaptive_k": "linear-adaptive1to3", "capacity": "linear-top1-cap1.25", "cosine": "cosine-top1",
        "noisy": "noisy-top1", "span": "linear-top1-span4", "temperature": "linear-top1-temp2",
        "top1": "linear-top1", "topk": "linear-top2",
    }  # fmt: skip


def test_defaults_are_switch_base_8_shaped():
    cfg = to_object(compose_config("collect"), CollectConfig)
    assert cfg.model.num_experts == 8 and cfg.router.k == 1 and cfg.router.gate == Gate.linear
    assert cfg.model.moe_layers == [1, 3, 5, 7, 9, 11]  # every other layer, like switch-base-8's decoder
    assert cfg.workdir == "outputs/default"


def test_smoke_experiment_shrinks_everything_and_names_the_workdir():
    cfg = to_object(compose_config("pipeline", ["experiment=smoke"]), PipelineConfig)
    assert cfg.workdir == "outputs/smoke"
    assert cfg.source_train.steps <= 200 and cfg.model.d_model <= 64
    assert len(cfg.model.moe_layers) >= 4  # lookahead up to d = 3 stays meaningful


def test_unknown_router_preset_is_one_clear_error():
    with pytest.raises(MissingConfigException, match="router/foo"):
        compose_config("collect", ["router=foo"])


def test_unknown_gate_type_names_the_valid_ones():
    with pytest.raises((ValidationError, ConfigCompositionException)) as err:
        compose_config("collect", ["router.gate=softsign"])
    message = str(err.value) + str(err.value.__cause__)
    assert "softsign" in message and "linear" in message and "cosine" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_experts=0", "model.num_experts=0 must be > 0"),
        ("model.num_experts=-4", "model.num_experts=-4 must be > 0"),
        ("router.k=9", "router asks for 9 experts per token but model.num_experts=8"),
        ("router.capacity_factor=0", "router.capacity_factor=0.0 must be > 0"),
        ("trace.seq_len=512", "trace.seq_len=512 exceeds model.max_seq_len=256"),
        ("corpus.val_fraction=0.96", "corpus.val_fraction=0.96 and corpus.test_fraction=0.05"),
        ("device=tpu", "device='tpu' is not auto, cpu or cuda"),
    ],
)
def test_bad_values_fail_with_the_key_and_value(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_object(compose_config("collect", [override]), CollectConfig)


def test_type_errors_fail_at_composition():
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_config("collect", ["model.num_experts=eight"])


# Presets that need a value no preset can know, and the value a user would give.
REQUIRED = {
    "model=hf": ["model.path=/models/tiny"],
    "corpus=text_files": ["corpus.glob=docs/*.md"],
    "corpus=hf_dataset": ["corpus.dataset=wikitext"],
    "model=embedded_smoke": ["source_train.seq_len=64", "trace.seq_len=64"],
}  # the smoke preset's model
GROUPS = sorted(
    (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
    for path in CONF_DIR.rglob("*.yaml")
    if path.parent != CONF_DIR and path.parent.name != "hydra"  # conf/hydra/default.yaml is the hydra node itself
)
EXPERIMENTS = sorted(preset for group, preset in GROUPS if group == "experiment")  # global: tested on their own
GROUP_OPTIONS = [(group, preset) for group, preset in GROUPS if group != "experiment"]


@pytest.mark.parametrize(("group", "preset"), GROUP_OPTIONS, ids=[f"{g}={p}" for g, p in GROUP_OPTIONS])
def test_every_preset_of_every_group_composes_and_validates(group, preset):
    override = f"{group}={preset}"
    if group.startswith("hydra/"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=[override], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
        return
    cfg = compose_config("pipeline", [override, *REQUIRED.get(override, [])])
    pipeline = to_object(cfg, PipelineConfig)  # every __post_init__ runs on the preset's values
    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{preset}.yaml"))  # "???" kept as is
    given = {item.split("=")[0] for item in REQUIRED.get(override, [])}
    for key, value in values.items():
        if key != "defaults" and f"{group}.{key}" not in given:  # a preset's own values win over its defaults
            assert OmegaConf.select(cfg, f"{group}.{key}") == value, (key, value)
    assert pipeline.workdir == "outputs/default"


def test_every_group_of_conf_is_covered():
    groups = {group.split("/")[0] for group, _ in GROUPS}
    assert groups == {"corpus", "eval", "experiment", "hardware", "hydra", "logger", "loss", "model", "predictor",
                      "router", "sim", "source_train", "target", "trace", "train"}  # fmt: skip


STAGES = {"collect": CollectConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "pipeline": PipelineConfig}
# What each experiment preset's workdir is (router_sweep's names the swept router, resolved inside each job).
WORKDIRS = {"checkpoint": "outputs/checkpoint", "debug": "outputs/debug", "gpu": "outputs/gpu",
            "loss_ablation": "outputs/default", "router_sweep": "outputs/router_sweep/top1",
            "smoke": "outputs/smoke"}  # fmt: skip


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", EXPERIMENTS)
def test_every_experiment_preset_fits_every_stage(preset, stage):
    overrides = [f"experiment={preset}"] + (["model.path=/models/tiny"] if preset == "checkpoint" else [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # what a job sees: ${hydra:runtime.choices.router} resolves
    try:
        typed = to_object(cfg, STAGES[stage])  # every __post_init__ runs on the preset's values
    finally:
        HydraConfig.instance().cfg = None
    assert typed.workdir == WORKDIRS[preset]


def test_presets_cover_what_researchers_run():
    assert {"smoke", "debug", "router_sweep", "loss_ablation", "gpu", "checkpoint"} <= set(EXPERIMENTS)


def test_the_sweep_presets_sweep_what_they_say():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        routers = compose("pipeline", ["experiment=router_sweep"], return_hydra_config=True).hydra.sweeper.params
        losses = compose("train", ["experiment=loss_ablation"], return_hydra_config=True).hydra.sweeper.params
    assert routers.router.split(",") == ["top1", "topk", "capacity", "temperature", "span", "adaptive_k"]
    assert set(losses.loss.split(",")) <= {p for g, p in GROUPS if g == "loss"} and losses.seed == "0,1,2"
    names = {default_run_name("transformer", 0, [f"loss={variant}"]) for variant in losses.loss.split(",")}
    assert len(names) == 7 and "transformer-loss=no_confidence-seed0" in names  # one run directory per variant


def test_the_smoke_preset_keeps_an_hf_models_own_name():
    cfg = to_object(compose_config("pipeline", ["experiment=smoke", "model=hf", "model.path=/models/mixtral-tiny"]),
                    PipelineConfig)  # fmt: skip
    assert cfg.model.display_name == "mixtral-tiny" and cfg.workdir == "outputs/smoke"
    assert cfg.trace.max_tokens_per_split == 8000  # the rest of the preset still applies
    assert to_object(compose_config("pipeline", ["experiment=smoke"]), PipelineConfig).model.name == "switch-lm-smoke"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_every_group_so_any_preset_applies(stage):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        choices = compose(config_name=stage, return_hydra_config=True).hydra.runtime.choices
    groups = {group.split("/")[0] for group, _ in GROUPS} - {"experiment", "hydra"}
    assert groups <= set(choices)


def test_the_gpu_preset_is_switch_base_8_sized():
    import torch

    from speculation.models.switch_lm import SwitchLM

    cfg = to_object(compose_config("pipeline", ["experiment=gpu"]), PipelineConfig)
    assert (cfg.model.d_model, cfg.model.d_ff, cfg.model.num_heads, cfg.model.moe_layers) == (
        768, 3072, 12, [1, 3, 5, 7, 9, 11],
    )  # fmt: skip
    with torch.device("meta"):  # shapes only, nothing allocated
        params = sum(p.numel() for p in SwitchLM(cfg.model, cfg.router).parameters())
    ffn = 2 * 768 * 3072  # wi, wo without biases
    by_hand = (6 * 8 * ffn + 6 * ffn  # 6 MoE layers of 8 experts, 6 dense FFNs
               + 12 * 4 * 768**2  # q, k, v, out per layer
               + 32768 * 768 + 512 * 768  # tied token embedding, positions
               + (12 * 2 + 1) * 768 + 6 * 768 * 8)  # RMSNorm gains, routers  # fmt: skip
    assert params == by_hand == 308_730_624 and cfg.device == "cuda"
