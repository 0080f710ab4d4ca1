"""Load a HuggingFace MoE checkpoint (hub id or local directory) and its tokenizer for tracing.

Requires transformers >= 5.18: earlier 5.x releases returned wrong Switch router logits, which would silently
corrupt every trace. Loading is offline-aware: a hub id that cannot be fetched fails with one line that says to
pass a local directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.version import Version

from speculation.config.model import ModelConfig
from speculation.corpus import Document
from speculation.errors import MissingInputError
from speculation.identity import files_sha256, json_sha256

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


def _source(cfg: ModelConfig) -> str:
    """``model.path`` as ``from_pretrained`` takes it: the local directory if there is one, else the hub id."""
    local = Path(str(cfg.path)).expanduser()
    if str(cfg.path).startswith((".", "/", "~")) and not local.exists():
        raise MissingInputError(f"model.path={cfg.path!r} does not exist. Fix the path.")
    return str(local) if local.exists() else str(cfg.path)


@contextmanager
def _fetching(cfg: ModelConfig, source: str) -> Iterator[None]:
    """Reading ``source`` from the hub: its offline / not-found errors (OSErrors) become one line that says to pass
    a local directory; a local directory's own errors pass through."""
    try:
        yield
    except OSError as error:
        if Path(source).exists():
            raise
        raise _offline_error(str(cfg.path), error) from None


def _model_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_hf_model(cfg: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model (eval mode) and its tokenizer, from ``cfg.path`` at ``cfg.revision``.

    Without ``model.device_map`` the whole model is loaded, then moved to ``device``. With one, ``from_pretrained``
    places each layer where the map says (Accelerate's big-model inference: GPUs, CPU, disk, within
    ``model.max_memory``) and the model stays there; feed it on :func:`input_device`.
    """
    check_transformers_version()
    from transformers import AutoConfig, AutoTokenizer

    source = _source(cfg)
    with _fetching(cfg, source):
        config = AutoConfig.from_pretrained(source, revision=cfg.revision)
        model = _model_class(config).from_pretrained(
            source, dtype=getattr(torch, cfg.dtype), revision=cfg.revision, **cfg.placement
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
    tokenizer.model_max_length = 1 << 30  # we chunk documents ourselves; silence "sequence too long" warnings
    if not cfg.placement:
        model = model.to(device)
    return model.eval(), tokenizer


def input_device(model: torch.nn.Module, default: torch.device) -> torch.device:
    """Where a model's inputs go: the input embedding's device for a device-mapped model (Accelerate moves each
    layer's inputs on from there), else ``default``."""
    if not getattr(model, "hf_device_map", None):
        return default
    weight = model.get_input_embeddings().weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")  # offloaded: fed from the host


def hf_skeleton(cfg: ModelConfig) -> torch.nn.Module:
    """The checkpoint's architecture on the meta device, from its config.json alone: every module and shape, no
    weight read or allocated (so a 47 B-parameter checkpoint costs milliseconds). What the start-of-run checks
    inspect to know the traced geometry before any work."""
    check_transformers_version()
    from transformers import AutoConfig

    source = _source(cfg)
    with _fetching(cfg, source):
        config = AutoConfig.from_pretrained(source, revision=cfg.revision)
    with torch.device("meta"):
        return _model_class(config).from_config(config)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
TOKENIZER_PATTERNS = ("tokenizer*", "*.model", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json")


def _config_sha256(model: torch.nn.Module) -> str:
    """The checkpoint's architecture and routing settings, without where it was loaded from."""
    config = model.config.to_dict()
    return json_sha256({k: v for k, v in config.items() if k not in ("_name_or_path", "_commit_hash")})


def hf_identity(cfg: ModelConfig, model: torch.nn.Module) -> dict:
    """What identifies the traced checkpoint: its path, config and weight files (names and sizes)."""
    local = Path(str(cfg.path)).expanduser()
    files = (
        sorted((p.relative_to(local).as_posix(), p.stat().st_size) for p in local.rglob("*") if p.is_file())
        if local.is_dir()
        else [["commit", getattr(model.config, "_commit_hash", None)]]
    )
    identity = {"path": str(cfg.path), "dtype": cfg.dtype, "config_sha256": _config_sha256(model), "files": files}
    if cfg.revision:  # only when set, so traces made before the key existed keep their identity
        identity["revision"] = cfg.revision
    return json.loads(json.dumps(identity))


def hf_model_digests(cfg: ModelConfig, model: torch.nn.Module) -> dict[str, str]:
    """What determines the checkpoint's routing, independent of its path and of any corpus: the weights', the
    tokenizer's and the config's digests (the manifest's ``model`` entry; the traces' fingerprint reads them).

    A local directory's files are hashed (reading them once costs far less than tracing with them); a hub
    checkpoint is pinned by its commit, which fixes every file.
    """
    local = Path(str(cfg.path)).expanduser()
    if not local.is_dir():
        commit = getattr(model.config, "_commit_hash", None) or str(cfg.path)
        weights = tokenizer = json_sha256({"hub": str(cfg.path), "commit": commit})
    else:
        files = [p for p in local.rglob("*") if p.is_file()]
        weights = files_sha256([p for p in files if p.suffix in WEIGHT_SUFFIXES], local)
        tokenizer = files_sha256([p for p in files if any(p.match(pattern) for pattern in TOKENIZER_PATTERNS)], local)
    return {
        "weights_sha256": weights,
        "tokenizer_sha256": tokenizer,
        "config_sha256": json_sha256({"config": _config_sha256(model), "dtype": cfg.dtype}),
    }


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
