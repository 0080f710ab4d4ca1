"""Schemas of a learned predictor: ``conf/predictor/`` (architecture), ``conf/loss/`` (loss weights) and
``conf/train/`` (optimisation)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from speculation.config.checks import positive, require

LOSS_TERMS = ("routing", "confidence", "consistency", "diversity")  # speculation/losses.py, one function each
ROUTING_MODES = ("ce", "kl")
# How a learned model uses gate lookahead (routers l+1..l+D on the hidden state entering l): not at all, as input
# features, as a residual prior added to its logits, or both.
GATE_LOOKAHEAD_MODES = ("none", "input", "prior", "both")


class PredictorKind(StrEnum):
    contextual = "contextual"  # attention over the current token's last layers' routing + its hidden state
    transformer = "transformer"  # causal transformer over earlier tokens + LSTM over the current token's layers
    hierarchical = "hierarchical"  # token-level and sequence-level heads mixed by learned fusion weights
    probe = "probe"  # two linear layers on the current (token, layer)'s hidden state, routing and gate lookahead


@dataclass
class PredictorConfig:
    """A learned predictor's architecture (``conf/predictor/``)."""

    kind: PredictorKind = PredictorKind.contextual
    d_model: int = 64
    max_lookahead: int = 4  # predicts layers l+1 .. l+max_lookahead in one pass
    context_layers: int = 3  # contextual: the current token's last layers it attends over
    num_heads: int = 4
    num_blocks: int = 2  # transformer: causal blocks over tokens
    dropout: float = 0.1
    max_positions: int = 512  # longest window (traced sequence) the learned position table covers
    # GATE_LOOKAHEAD_MODES; anything but none needs the traced routers' weights. conf/predictor/*.yaml sets both;
    # the schema keeps none, what runs made before the option did, so their saved identity still matches.
    gate_lookahead: str = "none"

    def __post_init__(self) -> None:
        for name in ("d_model", "max_lookahead", "context_layers", "num_heads", "num_blocks", "max_positions"):
            positive(f"predictor.{name}", getattr(self, name))
        require(
            self.d_model % self.num_heads == 0,
            f"predictor.d_model={self.d_model} must be divisible by predictor.num_heads={self.num_heads}.",
        )
        require(0 <= self.dropout < 1, f"predictor.dropout={self.dropout} must be in [0, 1).")
        require(
            self.gate_lookahead in GATE_LOOKAHEAD_MODES,
            f"predictor.gate_lookahead={self.gate_lookahead!r} is not one of {', '.join(GATE_LOOKAHEAD_MODES)}.",
        )

    @property
    def uses_routers(self) -> bool:
        """Whether the model holds the traced routers (gate lookahead as input or prior)."""
        return self.gate_lookahead != "none"


@dataclass
class LossConfig:
    """Weights of the predictor's loss terms (``speculation/losses.py``); 0 turns a term off."""

    routing_mode: str = "ce"  # ce: cross-entropy to the router's top-1 | kl: KL(router || prediction)
    routing: float = 1.0
    confidence: float = 0.5
    consistency: float = 0.0
    diversity: float = 0.05
    # Would-be misses (the target expert was used by none of the previous miss_window tokens at that layer) weigh
    # 1 + miss_weight in the routing loss: only they cost time, so a prefetch predictor should be right on them.
    miss_weight: float = 0.0
    miss_window: int = 4

    def __post_init__(self) -> None:
        require(
            self.routing_mode in ROUTING_MODES,
            f"loss.routing_mode={self.routing_mode!r} is not one of {', '.join(ROUTING_MODES)}.",
        )
        for name in LOSS_TERMS:
            require(getattr(self, name) >= 0, f"loss.{name}={getattr(self, name)} must be >= 0.")
        require(self.miss_weight >= 0, f"loss.miss_weight={self.miss_weight} must be >= 0 (0: every token alike).")
        positive("loss.miss_window", self.miss_window)

    @property
    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_TERMS}


@dataclass
class PredictorTrainConfig:
    """Optimisation of a learned predictor (``conf/train/``)."""

    steps: int = 1000
    batch_size: int = 32  # windows (traced sequences) per step
    lr: float = 2.0e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.15  # MLM-style: share of (token, layer) routing inputs hidden during training
    eval_every: int = 250
    val_windows: int = 256  # fixed validation windows for early stopping
    patience: int = 4  # evaluations without improvement before stopping
    checkpoint_every: int = 250
    overwrite: bool = False  # replace an existing run of this name instead of refusing one that differs

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "eval_every", "val_windows", "patience", "checkpoint_every"):
            positive(f"train.{name}", getattr(self, name))
        require(0 <= self.mask_prob < 1, f"train.mask_prob={self.mask_prob} must be in [0, 1).")
        require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0.")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0.")
        positive("train.grad_clip", self.grad_clip)
