"""Shared fixtures: tiny configs, W&B off, a composed Hydra config."""

from __future__ import annotations

import os
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
# A collect run of a few seconds: the smoke experiment on 40 short files, a 6-step source model.
TINY_COLLECT = [
    "experiment=smoke",
    "logger=none",
    "corpus.max_documents=40",
    "corpus.max_document_chars=6000",
    "model.vocab_size=300",
    "source_train.steps=6",
    "source_train.eval_every=3",
    "source_train.eval_batches=2",
    "trace.batch_size=4",
]
ROUTER_PRESETS = sorted(p.stem for p in (CONF_DIR / "router").glob("*.yaml"))


def compose_config(name: str = "collect", overrides: list[str] | None = None) -> DictConfig:
    """The config a console script would see for ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


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
