"""Schemas of the source model: ``conf/model/`` (:class:`ModelConfig`) and ``conf/router/`` (:class:`RouterConfig`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum  # members compare equal to their values: Gate.linear == "linear"
from typing import Any

from speculation.config.checks import positive, require


class Gate(StrEnum):
    linear = "linear"  # Switch: logits = x W
    noisy = "noisy"  # Shazeer et al. 2017: learned Gaussian noise on the logits while training
    cosine = "cosine"  # X-MoE (Chi et al. 2022): cosine of a low-dim projection and expert embeddings


class Selection(StrEnum):
    topk = "topk"  # a fixed k experts per token
    adaptive_k = "adaptive_k"  # 1..k_max experts per token, more when the router is unsure


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # from_pretrained's device_map


class ModelKind(StrEnum):
    embedded = "embedded"  # the Switch LM defined in speculation/models
    hf = "hf"  # any supported HuggingFace MoE, loaded with from_pretrained from a hub id or local dir


@dataclass
class RouterConfig:
    """How each MoE layer picks experts. Presets live in ``conf/router/``."""

    gate: Gate = Gate.linear
    selection: Selection = Selection.topk
    k: int = 1  # experts per token for selection=topk
    k_max: int = 2  # upper bound for selection=adaptive_k
    capacity_factor: float | None = None  # None: no dropping; else capacity = ceil(cf * tokens * k / E)
    temperature: float = 1.0  # logits are divided by this before the softmax
    span_length: int = 1  # >1: one routing decision per span of tokens, made by the span's first token
    cosine_dim: int = 16  # projection size for gate=cosine
    load_balance_coef: float = 0.01  # Switch eq. 4 weight (alpha)
    z_loss_coef: float = 0.001  # ST-MoE eq. 5 weight

    def __post_init__(self) -> None:
        positive("router.k", self.k, "Use k >= 1 experts per token.")
        positive("router.k_max", self.k_max)
        positive("router.temperature", self.temperature, "Use 1.0 for the plain softmax.")
        positive("router.span_length", self.span_length, "Use 1 for per-token routing.")
        positive("router.cosine_dim", self.cosine_dim)
        if self.capacity_factor is not None:
            positive("router.capacity_factor", self.capacity_factor, "Use null to disable token dropping.")
        require(self.load_balance_coef >= 0, f"router.load_balance_coef={self.load_balance_coef} must be >= 0.")
        require(self.z_loss_coef >= 0, f"router.z_loss_coef={self.z_loss_coef} must be >= 0.")

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RouterConfig:
        """Rebuild from ``asdict`` output that went through JSON (which turned the enums into their values)."""
        return cls(**{**values, "gate": Gate(values["gate"]), "selection": Selection(values["selection"])})

    @property
    def max_experts_per_token(self) -> int:
        return self.k_max if self.selection == Selection.adaptive_k else self.k

    @property
    def label(self) -> str:
        """What sets this router apart, for tags and tables: ``linear-top1``, ``linear-top2``,
        ``linear-top1-cap1.25``, ``cosine-top1``, ``linear-adaptive1to3``, ``linear-top1-temp2``, ``linear-top1-span4``
        (the loss coefficients only shape training, so they are left to the config)."""
        if self.selection == Selection.adaptive_k:
            parts = [str(self.gate), f"adaptive{self.k}to{self.k_max}"]
        else:
            parts = [str(self.gate), f"top{self.k}"]
        if self.capacity_factor is not None:
            parts.append(f"cap{self.capacity_factor:g}")
        if self.temperature != 1.0:
            parts.append(f"temp{self.temperature:g}")
        if self.span_length > 1:
            parts.append(f"span{self.span_length}")
        return "-".join(parts)


@dataclass
class ModelConfig:
    """The source MoE model. ``kind=embedded`` builds (and trains) our Switch LM; ``kind=hf`` loads ``path``.

    For ``kind=hf`` the architecture fields below are ignored: the checkpoint's config defines the model.
    """

    kind: ModelKind = ModelKind.embedded
    name: str | None = "switch-lm"  # None: the last component of ``path``
    path: str | None = None  # kind=hf: hub id (e.g. google/switch-base-8) or local directory
    dtype: str = "float32"  # kind=hf: float32 | bfloat16 | float16 weights
    revision: str | None = None  # kind=hf: the hub branch, tag or commit (None: the default branch)
    # kind=hf: where the layers go (Accelerate's big-model inference): None loads the whole model onto `device`;
    # auto | balanced | balanced_low_0 | sequential, or a dict of module name -> device (0, "cuda:1", "cpu", "disk")
    device_map: Any = None
    max_memory: Any = None  # with device_map: a dict of device -> budget, e.g. {0: 20GiB, cpu: 64GiB}
    offload_folder: str | None = None  # with "disk" in the device map: where offloaded weights are kept
    encoder_fraction: float = 0.5  # encoder-decoder models: share of each traced chunk the encoder reads
    vocab_size: int = 4096
    d_model: int = 128
    num_layers: int = 12
    num_heads: int = 4
    d_ff: int = 512
    num_experts: int = 8
    moe_every: int = 2  # layers moe_every-1, 2*moe_every-1, ... are MoE (switch-base-8: every other layer)
    max_seq_len: int = 256
    dropout: float = 0.0
    # kind=embedded: trace the source model trained in that workdir (its source_model/ and tokenizer) on this
    # corpus instead of training one here; its own config then sets the architecture and the router
    source_workdir: str | None = None

    def __post_init__(self) -> None:
        require(
            self.source_workdir is None or self.kind == ModelKind.embedded,
            f"model.source_workdir={self.source_workdir} is for the embedded model; a model=hf checkpoint is "
            "traced on any corpus as it is (model.path). Drop model.source_workdir.",
        )
        if self.kind == ModelKind.hf:
            require(
                bool(self.path),
                "model=hf needs model.path: a hub id (e.g. google/switch-base-8) or a local checkpoint directory.",
            )
        self._check_placement()
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype={self.dtype!r} is not one of float32, bfloat16, float16.",
        )
        require(
            0 < self.encoder_fraction < 1,
            f"model.encoder_fraction={self.encoder_fraction} must be in (0, 1): both encoder and decoder need tokens.",
        )
        positive("model.num_experts", self.num_experts, "An MoE needs at least one expert.")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "moe_every", "max_seq_len"):
            positive(f"model.{name}", getattr(self, name))
        require(
            self.d_model % self.num_heads == 0,
            f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}.",
        )
        require(
            self.moe_every <= self.num_layers,
            f"model.moe_every={self.moe_every} exceeds model.num_layers={self.num_layers}: the model would have "
            "no MoE layer. Lower moe_every.",
        )
        require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1).")

    def _check_placement(self) -> None:
        placed = {"model.device_map": self.device_map, "model.max_memory": self.max_memory,
                  "model.offload_folder": self.offload_folder, "model.revision": self.revision}  # fmt: skip
        given = [key for key, value in placed.items() if value is not None]
        require(
            self.kind == ModelKind.hf or not given,
            f"{', '.join(given)} apply to model=hf checkpoints; the embedded model is built on `device`. Drop them.",
        )
        if isinstance(self.device_map, str):
            require(
                self.device_map in DEVICE_MAP_STRATEGIES,
                f"model.device_map={self.device_map!r} is not one of {', '.join(DEVICE_MAP_STRATEGIES)} (or a dict "
                "of module name -> device, or null).",
            )
        elif self.device_map is not None:
            require(
                isinstance(self.device_map, Mapping) and len(self.device_map) > 0,
                f"model.device_map={self.device_map!r} must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}), a "
                "non-empty dict of module name -> device, or null.",
            )
        require(
            self.max_memory is None or (self.device_map is not None and isinstance(self.max_memory, Mapping)),
            f"model.max_memory={self.max_memory!r} needs model.device_map (e.g. auto) and must be a dict of "
            "device -> budget, e.g. {0: 20GiB, cpu: 64GiB}.",
        )
        on_disk = isinstance(self.device_map, Mapping) and "disk" in map(str, self.device_map.values())
        require(
            not on_disk or self.offload_folder is not None,
            "model.device_map puts layers on disk; set model.offload_folder=DIR for their weights.",
        )

    @property
    def placement(self) -> dict[str, Any]:
        """The ``from_pretrained`` keywords that place the model (empty: load it whole, then move it)."""
        if self.device_map is None:
            return {}

        def device(value: Any) -> Any:  # "0" from the command line is GPU 0, as Accelerate spells it
            return int(value) if isinstance(value, str) and value.isdigit() else value

        device_map = self.device_map
        if isinstance(device_map, Mapping):
            device_map = {str(name): device(where) for name, where in device_map.items()}
        out: dict[str, Any] = {"device_map": device_map}
        if self.max_memory is not None:
            out["max_memory"] = {device(key): value for key, value in self.max_memory.items()}
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        return out

    @property
    def display_name(self) -> str:
        return self.name or str(self.path).rstrip("/").split("/")[-1]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0]
