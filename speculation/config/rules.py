"""Cross-field rules that need the traced geometry: every one checked here, once, before a stage does any work.

The rules between fields of one schema live in its ``__post_init__`` (``sim.headline_lookahead`` must be one of
``sim.lookaheads``, say); the rules here compare the config with the traces: how many MoE layers there are (a
lookahead must leave a target layer), how many experts (a budget cannot exceed them) and how many experts one
token uses per layer (a cache must hold at least one layer's). All problems are reported together, in one error.
"""

from __future__ import annotations

from dataclasses import dataclass

from speculation.config.evaluate import EvalConfig
from speculation.config.simulate import SimConfig
from speculation.errors import UserError


@dataclass(frozen=True)
class Geometry:
    """What the rules need to know about a traced model."""

    num_layers: int  # MoE layers (L)
    num_experts: int  # experts per MoE layer (E)
    experts_per_token: int  # expert slots per token and layer (K)


def cache_slots(fraction: float, num_layers: int, num_experts: int) -> int:
    """GPU expert slots of a cache holding ``fraction`` of all ``num_layers × num_experts`` experts."""
    return round(fraction * num_layers * num_experts)


def evaluation_problems(eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry) -> list[str]:
    """Every way ``eval`` and ``sim`` do not fit ``geometry``, as one line each naming the key and the fix."""
    num_layers = geometry.num_layers
    problems = []
    if eval_cfg.max_lookahead >= num_layers:
        problems.append(
            f"eval.max_lookahead={eval_cfg.max_lookahead} but the traces have {num_layers} MoE layers: a lookahead d "
            f"must leave a target layer, d in 1..{num_layers - 1}; set eval.max_lookahead={num_layers - 1}."
        )
    if eval_cfg.prefetch_budget > geometry.num_experts:
        problems.append(
            f"eval.prefetch_budget={eval_cfg.prefetch_budget} must be in 1..{geometry.num_experts} (the expert count)."
        )
    if not sim.enabled:
        return problems
    if sim.candidates > geometry.num_experts:
        problems.append(
            f"sim.candidates={sim.candidates} must be in 1..{geometry.num_experts} (the expert count); "
            f"set sim.candidates={geometry.num_experts}."
        )
    too_far = [d for d in sim.lookaheads if d >= num_layers]
    if too_far:
        problems.append(
            f"sim.lookaheads has {too_far} but the traces have {num_layers} MoE layers: a prefetch can be issued at "
            f"most {num_layers - 1} layers ahead; drop those lookaheads."
        )
    slots_needed = geometry.experts_per_token
    for fraction in sim.cache_fractions:
        capacity = cache_slots(fraction, geometry.num_layers, geometry.num_experts)
        if capacity < slots_needed:
            problems.append(
                f"sim.cache_fractions has {fraction}: {capacity} expert slots of "
                f"{geometry.num_layers * geometry.num_experts}, fewer than the {slots_needed} experts one token uses "
                f"per layer; raise the fraction to at least "
                f"{slots_needed / (geometry.num_layers * geometry.num_experts):.3f}."
            )
    return problems


def check_evaluation(eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry, where: str) -> None:
    """One ``ValueError`` listing every problem of :func:`evaluation_problems` (``where``: the traces' path)."""
    problems = evaluation_problems(eval_cfg, sim, geometry)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        lines = "\n".join(f"- {problem}" for problem in problems)
        raise UserError(f"the config does not fit the traces in {where}:\n{lines}")
