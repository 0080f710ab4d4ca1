"""Shared fixtures: tiny configs, W&B off, composed Hydra configs, and one tiny workdir per test run.

``collected`` is the one collected workdir every test that needs real traces reads (built once per run);
``trained`` adds a predictor of each kind and ``evaluated`` the evaluation with the simulation. They are shared:
a test that writes into a workdir takes ``workdir`` (a fresh copy of ``collected``) or copies one itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B, not even offline
# No test needs the Hub; set before transformers/huggingface_hub are imported (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# A collect run of a few seconds: the smoke experiment on 40 short files, a 6-step source model, ~1500 traced
# tokens per split (2 shards of 16 sequences each).
TINY_COLLECT = [
    "experiment=smoke",
    "logger=none",
    "corpus.max_documents=40",
    "corpus.max_document_chars=6000",
    "model.vocab_size=300",
    "source_train.steps=6",
    "source_train.eval_every=3",
    "source_train.eval_batches=2",
    "source_train.require_beats_unigram=false",  # 6 steps learn little: this fixture tests wiring, not quality
    "trace.batch_size=4",
    "trace.max_tokens_per_split=1500",
]
# Predictors trained in a second: 8 steps, evaluated at 4 and 8, checkpointed every 3.
TINY_TRAIN = [
    "logger=none", "predictor.d_model=16", "predictor.max_lookahead=2", "train.steps=8", "train.batch_size=4",
    "train.warmup_steps=2", "train.eval_every=4", "train.val_windows=4", "train.checkpoint_every=3",
]  # fmt: skip
# A simulation of a few seconds on those traces.
TINY_SIM = ["sim.max_tokens=600", "sim.cache_fractions=[0.25,0.5,0.75]", "eval.bootstrap=20"]
ROUTER_PRESETS = sorted(p.stem for p in (CONF_DIR / "router").glob("*.yaml"))


def compose_config(name: str = "collect", overrides: list[str] | None = None) -> DictConfig:
    """The config a console script would see for ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def copy_workdir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny collected workdir of the whole test run: read it, never write into it."""
    from speculation.stages.collect import collect

    workdir = tmp_path_factory.mktemp("collected") / "work"
    collect(compose_config("collect", [*TINY_COLLECT, f"workdir={workdir}"]))
    return workdir


@pytest.fixture
def workdir(collected: Path, tmp_path: Path) -> Path:
    """A copy of ``collected`` to write into."""
    return copy_workdir(collected, tmp_path / "work")


@pytest.fixture(scope="session")
def trained(collected: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``collected`` plus one tiny predictor of each kind (``<kind>-seed0``), as the pipeline trains them."""
    from speculation.config import to_object
    from speculation.config.stages import PipelineConfig
    from speculation.stages.pipeline import train_all

    workdir = copy_workdir(collected, tmp_path_factory.mktemp("trained") / "work")
    train_all(to_object(compose_config("pipeline", [*TINY_COLLECT, *TINY_TRAIN, f"workdir={workdir}"]), PipelineConfig))
    return workdir


@pytest.fixture(scope="session")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``trained`` evaluated (metrics and a small simulation); the workdir and what ``evaluate`` returned."""
    from speculation.stages.evaluate import evaluate

    workdir = copy_workdir(trained, tmp_path_factory.mktemp("evaluated") / "work")
    out = evaluate(compose_config("evaluate", ["logger=none", f"workdir={workdir}", *TINY_SIM]))
    return workdir, out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
