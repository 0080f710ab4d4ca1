"""Schema of what ``spec-evaluate`` scores: ``conf/eval/``."""

from __future__ import annotations

from dataclasses import dataclass, field

from speculation.config.checks import check_seed, positive, require

# The baseline and heuristic rows of every table, in table order; speculation.predictors.HEURISTICS holds the
# classes under these names (checked when it is built).
HEURISTIC_METHODS = [
    "random",
    "frequency",
    "previous_token",
    "layer_minus_1",
    "multi_layer",
    "pattern",
    "adaptive",
    "gate_lookahead",
    "oracle",
]
STACKS = ("decoder", "encoder")  # token streams a trace store can hold (encoder: encoder-decoder models only)


@dataclass
class EvalConfig:
    """What ``spec-evaluate`` scores and how."""

    split: str = "test"  # the traced split scored (predictors are fitted on train)
    stack: str = "decoder"  # decoder: workdir/traces; encoder: workdir/traces/encoder (encoder-decoder models)
    # lookaheads d = 1..max_lookahead; None: 1..3, fewer if the traces have fewer than 4 MoE layers
    # (speculation.config.rules.fit_to_geometry fills it in once the traced geometry is known)
    max_lookahead: int | None = None
    prefetch_budget: int = 2  # budget of recall@budget: experts prefetched per token and layer
    methods: list[str] = field(default_factory=lambda: list(HEURISTIC_METHODS))  # baselines and heuristics
    bootstrap: int = 1000  # document resamples for confidence intervals
    seed: int = 0
    block_rows: int = 65536  # rows per evaluation block (whole sequences; bounds memory)
    max_tokens: int | None = None  # stop after about this many tokens (whole blocks); None = the whole split
    miss_window: int = 4  # a would-be miss: the target expert was used by none of the previous miss_window tokens

    def __post_init__(self) -> None:
        for name in ("prefetch_budget", "block_rows", "miss_window"):
            positive(f"eval.{name}", getattr(self, name))
        if self.max_lookahead is not None:
            positive("eval.max_lookahead", self.max_lookahead, "Use null for what the traced model allows.")
        check_seed("eval.seed", self.seed)
        if self.max_tokens is not None:
            positive("eval.max_tokens", self.max_tokens, "Use null for the whole split.")
        require(self.bootstrap >= 0, f"eval.bootstrap={self.bootstrap} must be >= 0 (0 skips intervals).")
        unknown = [m for m in self.methods if m not in HEURISTIC_METHODS]
        require(not unknown, f"eval.methods has unknown method(s) {unknown}; choose from {HEURISTIC_METHODS}.")
        require(self.stack in STACKS, f"eval.stack={self.stack!r} is not one of {', '.join(STACKS)}.")
