"""Load a HuggingFace MoE checkpoint (hub id or local directory) and its tokenizer for tracing.

Requires transformers >= 5.18: earlier 5.x releases returned wrong Switch router logits, which would silently
corrupt every trace. Loading is offline-aware: a hub id that cannot be fetched fails with one line that says to
pass a local directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.version import Version

from speculation.config.model import ModelConfig
from speculation.corpus import Document

MIN_TRANSFORMERS = Version("5.18")

log = logging.getLogger(__name__)


def check_transformers_version(version: str | None = None) -> None:
    """Refuse transformers releases whose Switch router logits are wrong."""
    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"transformers {version} is installed, but tracing HF models needs >= {MIN_TRANSFORMERS} (earlier 5.x "
            f'releases returned wrong Switch router logits). Upgrade: pip install "transformers>={MIN_TRANSFORMERS}"'
        )


def _offline_error(path: str, error: BaseException) -> ValueError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(
        f"model.path={path!r} is not a local directory and could not be fetched from the Hugging Face Hub "
        f"({type(error).__name__}: {reason}). If this machine is offline, download the checkpoint where there is "
        f"network (`hf download {path} --local-dir DIR`) and pass model.path=DIR."
    )


def load_hf_model(cfg: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model (eval mode, on ``device``) and its tokenizer, from ``cfg.path``."""
    check_transformers_version()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    local = Path(str(cfg.path)).expanduser()
    source = str(local) if local.exists() else str(cfg.path)
    if str(cfg.path).startswith((".", "/", "~")) and not local.exists():
        raise FileNotFoundError(f"model.path={cfg.path!r} does not exist. Fix the path.")
    try:
        config = AutoConfig.from_pretrained(source)
        model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = model_class.from_pretrained(source, dtype=getattr(torch, cfg.dtype))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:  # huggingface_hub's offline / not-found errors are OSErrors
        if local.exists():
            raise
        raise _offline_error(str(cfg.path), error) from None
    tokenizer.model_max_length = 1 << 30  # we chunk documents ourselves; silence "sequence too long" warnings
    return model.to(device).eval(), tokenizer


def hf_identity(cfg: ModelConfig, model: torch.nn.Module) -> dict:
    """What identifies the traced checkpoint: its path, config and weight files (names and sizes)."""
    config_hash = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()
    local = Path(str(cfg.path)).expanduser()
    files = (
        sorted((p.relative_to(local).as_posix(), p.stat().st_size) for p in local.rglob("*") if p.is_file())
        if local.is_dir()
        else [["commit", getattr(model.config, "_commit_hash", None)]]
    )
    return json.loads(
        json.dumps({"path": str(cfg.path), "dtype": cfg.dtype, "config_sha256": config_hash, "files": files})
    )


def encode_with_hf_tokenizer(tokenizer: Any, docs: list[Document]) -> list[np.ndarray]:
    """Token ids per document, without special tokens (chunking adds none either)."""
    encoded = tokenizer([doc.text for doc in docs], add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def pad_token_id(tokenizer: Any, model: torch.nn.Module) -> int:
    """The id used for right padding (masked out everywhere, so any valid id works)."""
    for candidate in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
