"""Cross-field rules that need the traced geometry: every one checked here, once, before a stage does any work.

The rules between fields of one schema live in its ``__post_init__`` (``sim.headline_lookahead`` must be one of
``sim.lookaheads``, say); the rules here compare the config with the traces: how many MoE layers there are (a
lookahead must leave a target layer), how many experts (a budget cannot exceed them) and how many experts one
token uses per layer (a cache must hold at least one layer's). All problems are reported together, in one error.

The keys left at ``null`` (``eval.max_lookahead``, ``sim.lookaheads``, ``sim.headline_lookahead``,
``sim.cache_fractions``) mean "the defaults, as far as the traced model allows": :func:`fit_to_geometry` fills them
in, so a 2-MoE-layer model runs with d = 1 out of the box, while a value the user typed that cannot fit is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from speculation.config.evaluate import EvalConfig
from speculation.config.predictor import PredictorConfig
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


DEFAULT_LOOKAHEADS = (1, 2, 3)  # what eval.max_lookahead / sim.lookaheads = null ask for, where they fit
DEFAULT_HEADLINE_LOOKAHEAD = 2
DEFAULT_CACHE_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def fit_to_geometry(eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry) -> tuple[EvalConfig, SimConfig]:
    """``eval`` and ``sim`` with every ``null`` key filled in from the defaults that fit ``geometry``; the keys the
    user set are kept as they are (:func:`evaluation_problems` then says if they do not fit)."""
    if geometry.num_layers < 2:
        return eval_cfg, sim  # nothing fits; evaluation_problems says why
    reachable = [d for d in DEFAULT_LOOKAHEADS if d < geometry.num_layers]
    if eval_cfg.max_lookahead is None:
        eval_cfg = dataclasses.replace(eval_cfg, max_lookahead=max(reachable, default=0))
    lookaheads = sim.lookaheads if sim.lookaheads is not None else reachable
    headline = sim.headline_lookahead
    if headline is None:
        headline = min(lookaheads, key=lambda d: abs(d - DEFAULT_HEADLINE_LOOKAHEAD), default=0)
    fractions = sim.cache_fractions
    if fractions is None:
        fractions = [
            f for f in DEFAULT_CACHE_FRACTIONS
            if cache_slots(f, geometry.num_layers, geometry.num_experts) >= geometry.experts_per_token
        ]  # fmt: skip
    # replace() runs SimConfig's own checks again, on the values filled in
    sim = dataclasses.replace(sim, lookaheads=lookaheads, headline_lookahead=headline, cache_fractions=fractions)
    return eval_cfg, sim


def evaluation_problems(eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry) -> list[str]:
    """Every way ``eval`` and ``sim`` (their ``null`` keys filled in by :func:`fit_to_geometry`) do not fit
    ``geometry``, as one line each naming the key and the fix."""
    num_layers = geometry.num_layers
    if num_layers < 2:
        return [
            f"the traces have {num_layers} MoE layer: speculation predicts the experts of a later MoE layer, so the "
            "model needs at least 2. Trace a model with more MoE layers."
        ]
    eval_cfg, sim = fit_to_geometry(eval_cfg, sim, geometry)
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


def trace_lookahead_problem(lookahead: int | None, num_layers: int, where: str) -> str | None:
    """Why ``trace.gate_lookahead`` cannot be stored for ``num_layers`` MoE layers (``where``: the model), or None."""
    if lookahead is None or lookahead < num_layers:
        return None
    fix = f"trace.gate_lookahead={num_layers - 1}" if num_layers > 1 else "trace.gate_lookahead=null"
    return (
        f"trace.gate_lookahead={lookahead} but {where} has {num_layers} MoE layers: a lookahead must leave a target "
        f"layer; set {fix}."
    )


def learned_input_problem(
    predictor: PredictorConfig, layers: list[int], num_layers: int, projection: int | None, where: str
) -> str | None:
    """Why traces keeping the hidden states of ``layers`` (of ``num_layers``), projected to width ``projection``
    (``trace.hidden_projection``; None: as they were), cannot train ``predictor``, or None. ``where``: the traces.

    One owner for ``spec-train`` (against a manifest) and ``spec-pipeline`` (against the trace config, at start).
    """
    if layers != list(range(num_layers)):
        return (
            f"{where} holds hidden states of MoE layers {layers}, but learned predictors need all {num_layers}; "
            "re-collect with trace.save_hidden=true trace.hidden_layers=null."
        )
    if projection is not None and predictor.uses_routers:
        return (
            f"predictor.gate_lookahead={predictor.gate_lookahead} applies the traced routers to the hidden states, but "
            f"{where} holds them randomly projected to width {projection} (trace.hidden_projection={projection}); "
            "train with predictor.gate_lookahead=none, or re-collect with trace.hidden_projection=null."
        )
    return None


def check_evaluation(eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry, where: str) -> None:
    """One ``ValueError`` listing every problem of :func:`evaluation_problems` (``where``: the traces' path)."""
    problems = evaluation_problems(eval_cfg, sim, geometry)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        lines = "\n".join(f"- {problem}" for problem in problems)
        raise UserError(f"the config does not fit the traces in {where}:\n{lines}")


def fitted_evaluation(
    eval_cfg: EvalConfig, sim: SimConfig, geometry: Geometry, where: str
) -> tuple[EvalConfig, SimConfig]:
    """The config a stage runs with (:func:`fit_to_geometry`), or one clear error (:func:`check_evaluation`)."""
    check_evaluation(eval_cfg, sim, geometry, where)
    return fit_to_geometry(eval_cfg, sim, geometry)
