"""The rules between the config and the traced geometry (``speculation.config.rules``): each named with its key
and fix, all reported in one error, the simulator's ones only when it runs."""

from __future__ import annotations

import pytest

from speculation.config.evaluate import EvalConfig
from speculation.config.rules import (
    Geometry,
    cache_slots,
    check_evaluation,
    evaluation_problems,
    fit_to_geometry,
    fitted_evaluation,
)
from speculation.config.simulate import SimConfig

SIX_BY_EIGHT = Geometry(num_layers=6, num_experts=8, experts_per_token=1)


def test_the_defaults_fit_a_switch_base_8_shaped_model():
    assert evaluation_problems(EvalConfig(), SimConfig(), SIX_BY_EIGHT) == []
    check_evaluation(EvalConfig(), SimConfig(), SIX_BY_EIGHT, "traces")


def test_cache_slots_are_the_rounded_share_of_all_experts():
    assert cache_slots(0.5, 6, 8) == 24 and cache_slots(0.125, 6, 8) == 6 and cache_slots(0.01, 6, 8) == 0


@pytest.mark.parametrize(
    ("eval_cfg", "sim", "message"),
    [
        (EvalConfig(max_lookahead=6), SimConfig(), r"eval.max_lookahead=6 but the traces have 6 MoE layers: .*"
                                                   r"d in 1..5; set eval.max_lookahead=5\."),
        (EvalConfig(prefetch_budget=9), SimConfig(), r"eval.prefetch_budget=9 must be in 1..8 \(the expert count\)"),
        (EvalConfig(), SimConfig(lookaheads=[2, 6, 7]), r"sim.lookaheads has \[6, 7\] but the traces have 6 MoE "
                                                        r"layers: .* at most 5 layers ahead; drop those"),
        (EvalConfig(), SimConfig(cache_fractions=[0.01, 0.5]), r"sim.cache_fractions has 0.01: 0 expert slots of 48, "
                                                               r"fewer than the 1 experts .* at least 0.021"),
    ],
)  # fmt: skip
def test_each_rule_names_the_key_the_value_and_the_fix(eval_cfg, sim, message):
    with pytest.raises(ValueError, match=message) as err:
        check_evaluation(eval_cfg, sim, SIX_BY_EIGHT, "traces")
    assert "\n" not in str(err.value)  # one problem: one line


def test_every_problem_is_reported_at_once():
    problems = evaluation_problems(
        EvalConfig(max_lookahead=9, prefetch_budget=20), SimConfig(lookaheads=[2, 8], cache_fractions=[0.01, 0.5]),
        SIX_BY_EIGHT,
    )  # fmt: skip
    assert [p.split(" ")[0] for p in problems] == ["eval.max_lookahead=9", "eval.prefetch_budget=20",
                                                   "sim.lookaheads", "sim.cache_fractions"]  # fmt: skip
    with pytest.raises(ValueError, match=r"does not fit the traces in where:\n- eval.max_lookahead") as err:
        check_evaluation(EvalConfig(max_lookahead=9), SimConfig(lookaheads=[2, 8]), SIX_BY_EIGHT, "where")
    assert str(err.value).count("\n- ") == 2


def test_the_simulators_rules_apply_only_when_it_runs():
    sim = SimConfig(enabled=False, lookaheads=[2, 8], cache_fractions=[0.01, 0.5])
    assert evaluation_problems(EvalConfig(), sim, SIX_BY_EIGHT) == []


def test_a_cache_must_hold_every_expert_a_token_uses_in_one_layer():
    top2 = Geometry(num_layers=4, num_experts=8, experts_per_token=2)
    (problem,) = evaluation_problems(EvalConfig(), SimConfig(cache_fractions=[0.03, 0.5]), top2)
    assert "fewer than the 2 experts one token uses per layer" in problem and "at least 0.062" in problem


def test_null_keys_are_the_defaults_where_the_model_has_room_for_them():
    eval_cfg, sim = fit_to_geometry(EvalConfig(), SimConfig(), SIX_BY_EIGHT)
    assert eval_cfg.max_lookahead == 3 and sim.lookaheads == [1, 2, 3] and sim.headline_lookahead == 2
    assert sim.cache_fractions == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]


def test_a_two_layer_model_gets_the_lookahead_it_has_and_the_caches_that_hold_a_token():
    # 2 MoE layers x 4 experts, top-2: only d = 1 leaves a target layer, and 1/8 of 8 slots is 1 < 2 experts
    eval_cfg, sim = fitted_evaluation(EvalConfig(), SimConfig(), Geometry(2, 4, 2), "traces")
    assert eval_cfg.max_lookahead == 1 and sim.lookaheads == [1] and sim.headline_lookahead == 1
    assert sim.cache_fractions == [0.25, 0.375, 0.5, 0.625, 0.75, 0.875]


def test_keys_the_user_set_are_kept_and_refused_if_they_do_not_fit():
    eval_cfg, sim = fit_to_geometry(EvalConfig(max_lookahead=2), SimConfig(lookaheads=[1, 3]), SIX_BY_EIGHT)
    assert eval_cfg.max_lookahead == 2 and sim.lookaheads == [1, 3] and sim.headline_lookahead == 1  # nearest 2
    with pytest.raises(ValueError, match=r"sim.lookaheads has \[2\] but the traces have 2 MoE layers"):
        fitted_evaluation(EvalConfig(), SimConfig(lookaheads=[1, 2]), Geometry(2, 4, 2), "traces")


def test_a_model_with_one_moe_layer_has_nothing_to_speculate_on():
    (problem,) = evaluation_problems(EvalConfig(), SimConfig(), Geometry(1, 8, 1))
    assert problem.startswith("the traces have 1 MoE layer") and "at least 2" in problem
