"""Hydra composition and config validation: bad values fail at start with one clear message."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, ROUTER_PRESETS, compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from speculation.config import CollectConfig, Gate, PipelineConfig, to_object


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
REQUIRED = {"model=hf": ["model.path=/models/tiny"], "corpus=text_files": ["corpus.glob=docs/*.md"],
            "corpus=hf_dataset": ["corpus.dataset=wikitext"]}  # fmt: skip
GROUPS = sorted(
    (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
    for path in CONF_DIR.rglob("*.yaml")
    if path.parent != CONF_DIR and path.parent.name != "hydra"  # conf/hydra/default.yaml is the hydra node itself
)


@pytest.mark.parametrize(("group", "preset"), GROUPS, ids=[f"{g}={p}" for g, p in GROUPS])
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
    if group != "experiment":  # experiment files are global packages; the others land in their group's node
        for key, value in values.items():
            if key != "defaults" and f"{group}.{key}" not in given:  # a preset's own values win over its defaults
                assert OmegaConf.select(cfg, f"{group}.{key}") == value, (key, value)
    assert pipeline.workdir == ("outputs/smoke" if override == "experiment=smoke" else "outputs/default")


def test_every_group_of_conf_is_covered():
    groups = {group.split("/")[0] for group, _ in GROUPS}
    assert groups == {"corpus", "eval", "experiment", "hardware", "hydra", "logger", "loss", "model", "predictor",
                      "router", "sim", "source_train", "target", "trace", "train"}  # fmt: skip
