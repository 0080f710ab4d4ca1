"""Loading HF checkpoints: the transformers version floor and the one-line offline error."""

from __future__ import annotations

import pytest
import torch

from speculation.config import ModelConfig, ModelKind
from speculation.models.hf import check_transformers_version, load_hf_model


@pytest.mark.parametrize("version", ["5.17.0", "5.0.0", "4.57.1"])
def test_old_transformers_is_refused_with_the_fix(version):
    with pytest.raises(RuntimeError, match=r"needs >= 5\.18.*wrong Switch router logits.*pip install"):
        check_transformers_version(version)


@pytest.mark.parametrize(
    ("version", "accepted"), [("5.18.0", True), ("5.18.0rc1", False), ("5.24.1", True), ("6.0", True)]
)
def test_the_floor_is_5_18_exactly(version, accepted):
    if accepted:
        check_transformers_version(version)
    else:
        with pytest.raises(RuntimeError, match=f"transformers {version} is installed"):
            check_transformers_version(version)


def test_offline_hub_id_is_one_line_that_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model.path='google/switch-base-8'.*pass model.path=DIR") as err:
        load_hf_model(ModelConfig(kind=ModelKind.hf, path="google/switch-base-8"), torch.device("cpu"))
    assert "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_missing_local_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_model(ModelConfig(kind=ModelKind.hf, path=str(tmp_path / "nope")), torch.device("cpu"))
