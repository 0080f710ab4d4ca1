"""The simulation's parts (``speculation.cache.timing``, ``plans``, ``simulation``): profiles and timing golden
values, the traced target, prefetch plans and confidence thresholds, and one clear error per bad setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config
from synthetic import synthetic_manifest

from speculation.cache.kernel import replay
from speculation.cache.plans import (
    RankedPredictions,
    ReplayTrace,
    candidate_plan,
    confidence_plan,
    issue_layers,
    source_layers,
    topb_plan,
)
from speculation.cache.simulation import confidence_thresholds, policy_runs, replay_row
from speculation.cache.timing import TimingModel, resolve_target
from speculation.config import to_object
from speculation.config.simulate import SimConfig, TargetConfig
from speculation.config.stages import EvaluateConfig
from speculation.traces import Manifest


def test_profiles_give_the_hand_computed_expert_sizes_and_timings():
    cfg = to_object(compose_config("evaluate", []), EvaluateConfig)
    assert (cfg.hardware.name, cfg.target.name) == ("rtx3090", "switch-base-8")
    assert cfg.target.expert_bytes == 2 * 768 * 3072 * 2 == 9_437_184
    timing = TimingModel.from_profiles(cfg.hardware, cfg.target)
    assert timing.copy_s == pytest.approx(6e-6 + 9_437_184 / 24e9)  # 399.2 µs
    assert timing.expert_s == pytest.approx(9_437_184 / 936e9 + 2 * 5e-6)  # memory-bound + 2 launches
    # 2 blocks' attention (4·768² each) + one dense FFN (2·768·3072) + the router (768·8), fp16, + 16 launches
    non_expert_bytes = 2 * (2 * 4 * 768**2 + 2 * 768 * 3072 + 768 * 8)
    assert timing.non_expert_s == pytest.approx(non_expert_bytes / 936e9 + 16 * 5e-6)
    assert timing.head_s == pytest.approx(32128 * 768 * 2 / 936e9 + 5e-6)
    mixtral = to_object(compose_config("evaluate", ["target=mixtral_8x7b", "hardware=h100"]), EvaluateConfig)
    assert mixtral.target.expert_bytes == 3 * 4096 * 14336 * 2 and mixtral.hardware.hbm_gbs == 3350.0
    qwen = to_object(compose_config("evaluate", ["target=qwen3_30b_a3b"]), EvaluateConfig).target
    assert qwen.expert_bytes == 3 * 2048 * 768 * 2


def test_traced_target_reads_the_manifest():
    manifest = Manifest.from_dict(
        synthetic_manifest(
            {"num_experts": 4, "layers": ["decoder.1"]},
            model={"name": "tiny"},
            geometry={"d_model": 64, "d_ff": 256, "vocab_size": 500},
        )
    )
    target = resolve_target(TargetConfig(name="traced"), manifest)
    assert (target.name, target.expert_bytes, target.attention_params) == ("tiny", 2 * 64 * 256 * 2, 4 * 64 * 64)
    assert target.vocab_size == 500  # the traced model's LM head, not the default target's
    assert resolve_target(TargetConfig(), manifest) == TargetConfig()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sim.cache_fractions=[1.5]", r"sim.cache_fractions has 1.5; each must be in \(0, 1\]"),
        ("sim.policies=[on_demand,psychic]", r"unknown policy\(ies\) \['psychic'\]"),
        ("sim.evictions=[fifo]", r"unknown eviction\(s\) \['fifo'\]"),
        ("hardware.hbm_gbs=0", r"hardware.hbm_gbs=0.0 must be > 0. Check the profile in conf/hardware/"),
        ("sim.confidence_low=1.5", r"sim.confidence_low=1.5 must be in \[0, 1\] \(or null: automatic\)"),
    ],
)
def test_bad_simulation_settings_are_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        to_object(compose_config("evaluate", [override]), EvaluateConfig)


def test_confidence_thresholds_must_be_ordered_and_default_to_the_break_even():
    with pytest.raises(ValueError, match=r"confidence_low=0.9 and confidence_high=0.5 must satisfy low <= high"):
        SimConfig(confidence_low=0.9, confidence_high=0.5)
    timing = TimingModel(copy_s=4e-4, expert_s=2e-5, non_expert_s=1e-4, head_s=5e-5, expert_bytes=1)
    # a right prefetch hides d layers (120 µs each), a wrong one costs a 400 µs copy: c* = 400 / (400 + 120 d)
    assert timing.break_even_confidence(2) == pytest.approx(400 / 640)
    assert confidence_thresholds(SimConfig(), timing, 1, 1) == pytest.approx((400 / 520, 400 / 520))
    assert confidence_thresholds(SimConfig(confidence_low=0.3, confidence_high=0.9), timing, 1, 1) == (0.3, 0.9)


def test_a_headline_outside_the_sweep_is_refused():
    with pytest.raises(ValueError, match=r"sim.headline_lookahead=2 is not one of sim.lookaheads=\[1, 3\]"):
        SimConfig(lookaheads=[1, 3], headline_lookahead=2)
    with pytest.raises(ValueError, match=r"sim.headline_fraction=0.5 is not one of sim.cache_fractions=\[0.25\]"):
        SimConfig(cache_fractions=[0.25])
    assert SimConfig(cache_fractions=[0.25, 0.1 + 0.4], headline_fraction=0.5).headline_cache_fraction == 0.1 + 0.4


def test_a_replay_row_is_the_kernels_counters_per_token():
    experts = np.array([[[0], [1]], [[0], [1]], [[1], [0]]], dtype=np.int32)  # 3 tokens, 2 layers
    trace = ReplayTrace(experts, 2, {})
    timing = TimingModel(copy_s=4e-4, expert_s=2e-5, non_expert_s=1e-4, head_s=5e-5, expert_bytes=1000)
    (run,) = policy_runs(
        trace, SimConfig(policies=["on_demand"], evictions=["lru"], lookaheads=[1], headline_lookahead=1), timing, 5e-6
    )
    row = replay_row(trace, run, capacity=4, timing=timing)
    counters = replay(experts_TLK=experts, num_experts=2, run=run, capacity=4, timing=timing).counters
    # an unbounded cache: tokens 0 and 2 miss twice each, token 1 hits twice (layer 0 expert 0, layer 1 expert 1)
    assert (counters.misses, counters.hits) == (4, 2)
    assert row["miss_rate"] == pytest.approx(4 / 6) and row["bytes_moved_per_token"] == pytest.approx(4 * 1000 / 3)
    assert row["stall_ms_per_token"] == pytest.approx(1e3 * 4 * 4e-4 / 3)  # every demand copy stalls its whole length


def test_issue_layers_and_plans_follow_the_lookahead():
    assert issue_layers(6, 2).tolist() == [-1, 0, 0, 1, 2, 3]
    assert issue_layers(3, 5).tolist() == [-1, 0, 0]
    # 1 token, 3 layers, lookaheads 1..2, 2 ranked experts; confidence per (source layer, d)
    ranked = np.full((1, 3, 2, 2), -1, dtype=np.int16)
    confidence = np.full((1, 3, 2), np.nan, dtype=np.float32)
    ranked[0, 0, 0], confidence[0, 0, 0] = [4, 5], 0.9  # from layer 0 for layer 1
    ranked[0, 0, 1], confidence[0, 0, 1] = [6, 7], 0.3  # from layer 0 for layer 2
    ranked[0, 1, 0], confidence[0, 1, 0] = [1, 2], 0.5  # from layer 1 for layer 2
    predictions = RankedPredictions(ranked, confidence)
    assert predictions.max_lookahead == 2
    assert topb_plan(predictions, 1, 1).experts_TLHR[0, :, 0].tolist() == [[-1], [4], [1]]
    assert topb_plan(predictions, 2, 2).experts_TLHR[0, :, 0].tolist() == [[-1, -1], [4, 5], [6, 7]]
    # confident (0.9 >= 0.8): one expert; unsure (0.3): two; below low=0.4: none
    assert confidence_plan(predictions, 2, 0.0, 0.8, 2).experts_TLHR[0, :, 0].tolist() == [[-1, -1], [4, -1], [6, 7]]
    assert confidence_plan(predictions, 2, 0.4, 0.8, 2).experts_TLHR[0, :, 0].tolist() == [[-1, -1], [4, -1], [-1, -1]]


def test_a_multi_horizon_plan_predicts_each_target_from_every_layer_in_reach():
    assert source_layers(4, 2).tolist() == [[-1], [0], [0], [1]]
    assert source_layers(4, 2, multi_horizon=True).tolist() == [[-1, -1], [0, -1], [1, 0], [2, 1]]
    ranked = np.full((1, 3, 2, 2), -1, dtype=np.int16)
    probs = np.full(ranked.shape, np.nan, dtype=np.float32)
    ranked[0, 0, 1], probs[0, 0, 1] = [6, 7], [0.6, 0.3]  # from layer 0 for layer 2 (d = 2)
    ranked[0, 1, 0], probs[0, 1, 0] = [7, 6], [0.8, 0.1]  # from layer 1 for layer 2 (d = 1)
    ranked[0, 0, 0], probs[0, 0, 0] = [4, 5], [0.9, 0.1]  # from layer 0 for layer 1
    predictions = RankedPredictions(ranked, np.zeros((1, 3, 2), dtype=np.float32), probs)
    plan = candidate_plan(predictions, 2, 2, multi_horizon=True)
    assert plan.sources_LH.tolist() == [[-1, -1], [0, -1], [1, 0]]
    assert plan.experts_TLHR[0, 2].tolist() == [[7, 6], [6, 7]]  # nearest source first
    assert plan.probs_TLHR[0, 2].ravel().tolist() == pytest.approx([0.8, 0.1, 0.6, 0.3])
    assert plan.experts_TLHR[0, 1].tolist() == [[4, 5], [-1, -1]]


def test_a_measured_profile_sets_each_learned_predictors_latency(tmp_path):
    from speculation.cache.simulation import check_predictor_costs, method_latencies

    profile = tmp_path / "cost.json"
    profile.write_text(json.dumps({"predictors": {"contextual": {"us_per_step_mean": 250.0}}}))
    ranked = RankedPredictions(np.zeros((1, 2, 1, 1), dtype=np.int16), np.zeros((1, 2, 1), dtype=np.float32))
    trace = ReplayTrace(np.zeros((1, 2, 1), dtype=np.int32), 2, {"gate_lookahead": ranked, "ctx-seed0": ranked},
                        {"gate_lookahead": "", "ctx-seed0": "contextual"})  # fmt: skip
    assert method_latencies(trace, SimConfig(), 5e-6) == {"gate_lookahead": 5e-6, "ctx-seed0": pytest.approx(1e-5)}
    measured = SimConfig(predictor_profile=str(profile))
    assert method_latencies(trace, measured, 5e-6) == {"gate_lookahead": 5e-6, "ctx-seed0": pytest.approx(2.5e-4)}
    check_predictor_costs(measured, ["contextual", ""])
    with pytest.raises(
        ValueError, match=r"has no cost for predictor kind\(s\) \['transformer'\] \(it has \['contextual'\]\)"
    ):
        check_predictor_costs(measured, ["contextual", "transformer"])
    with pytest.raises(ValueError, match=r"sim.predictor_profile=.*nowhere.json is not a file; write it with"):
        SimConfig(predictor_profile=str(tmp_path / "nowhere.json"))
    profile.write_text("{}")
    with pytest.raises(ValueError, match=r"is not a profile of benchmarks/predictor_cost_bench.py"):
        check_predictor_costs(measured, ["contextual"])
