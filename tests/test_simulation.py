"""The simulation end to end: profiles and timing golden values, prefetch plans, and spec-evaluate's
simulation.csv on real (tiny) traces with trained predictors: the bounds hold and the oracle is never beaten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_COLLECT, compose_config

from collect.main import collect
from evaluate.main import evaluate
from speculation.cache.config import SimConfig, TargetConfig
from speculation.cache.plans import RankedPredictions, ReplayTrace, confidence_plan, issue_layers, topb_plan
from speculation.cache.simulation import capacity_for, confidence_thresholds, simulate_sweep
from speculation.cache.timing import TimingModel
from speculation.config import EvaluateConfig, PipelineConfig, to_object
from speculation.pipeline import train_all

TINY_TRAIN = [
    "predictor.d_model=16", "predictor.max_lookahead=2", "train.steps=8", "train.batch_size=4",
    "train.warmup_steps=2", "train.eval_every=4", "train.val_windows=4", "train.checkpoint_every=4",
]  # fmt: skip
SIM = ["sim.max_tokens=600", "sim.cache_fractions=[0.25,0.5,0.75]", "eval.bootstrap=20"]
REALIZABLE_EVICTIONS = ["lru", "lfu", "predicted"]


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
    manifest = {"model": {"name": "tiny"}, "geometry": {"d_model": 64, "d_ff": 256, "num_experts": 4}}
    target = TargetConfig.from_manifest(manifest, TargetConfig(name="traced"))
    assert (target.name, target.expert_bytes, target.attention_params) == ("tiny", 2 * 64 * 256 * 2, 4 * 64 * 64)


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


def test_a_cache_too_small_for_one_layer_or_a_lookahead_past_the_last_layer_is_refused():
    assert capacity_for(0.5, 6, 8, 1) == 24
    with pytest.raises(ValueError, match=r"fewer than the 2 experts one token uses per layer; raise the fraction"):
        capacity_for(0.01, 6, 8, 2)
    trace = ReplayTrace(np.zeros((10, 4, 1), dtype=np.int32), 8, {})
    timing = TimingModel(copy_s=4e-4, expert_s=2e-5, non_expert_s=1e-4, head_s=5e-5, expert_bytes=1)
    with pytest.raises(ValueError, match=r"sim.lookaheads has \[4, 6\] but the traces have 4 MoE layers"):
        simulate_sweep(trace, SimConfig(lookaheads=[1, 4, 6]), timing, 5e-6, {})


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
    assert topb_plan(predictions, 1, 1)[0].tolist() == [[-1], [4], [1]]
    assert topb_plan(predictions, 2, 2)[0].tolist() == [[-1, -1], [4, 5], [6, 7]]
    # confident (0.9 >= 0.8): one expert; unsure (0.3): two; below low=0.4: none
    assert confidence_plan(predictions, 2, 0.0, 0.8, 2)[0].tolist() == [[-1, -1], [4, -1], [6, 7]]
    assert confidence_plan(predictions, 2, 0.4, 0.8, 2)[0].tolist() == [[-1, -1], [4, -1], [-1, -1]]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    workdir = tmp_path_factory.mktemp("simulation")
    overrides = [*TINY_COLLECT, f"workdir={workdir}", "trace.max_tokens_per_split=1500", *TINY_TRAIN, *SIM]
    cfg = to_object(compose_config("pipeline", overrides), PipelineConfig)
    collect(cfg)
    train_all(cfg)
    out = evaluate(cfg)
    return workdir, out["simulation"]


def test_the_pipeline_trains_one_predictor_per_kind(simulated):
    workdir, _ = simulated
    assert sorted(p.name for p in (workdir / "predictors").iterdir()) == [
        "contextual-seed0", "hierarchical-seed0", "transformer-seed0",
    ]  # fmt: skip


def test_simulation_csv_has_every_policy_and_column(simulated):
    workdir, frame = simulated
    written = pd.read_csv(workdir / "eval" / "simulation.csv", keep_default_na=False)
    required = {"policy", "eviction", "hardware", "target", "cache_fraction", "lookahead", "ms_per_token", "stall_ms",
                "hit_rate", "bytes_moved", "wasted_bytes", "speedup_vs_on_demand", "oracle_gain_fraction"}  # fmt: skip
    assert required <= set(written.columns) and len(written) == len(frame)
    assert set(written["policy"]) == {"on_demand", "gate_lookahead", "predictor_topb", "predictor_confidence", "oracle"}
    assert set(written[written["policy"] == "predictor_topb"]["predictor"]) == {
        "contextual-seed0", "transformer-seed0", "hierarchical-seed0",
    }  # fmt: skip
    # the predictors reach d <= 2: no predictor rows at lookahead 3, gate-lookahead and the oracle still there
    at3 = written[written["lookahead"] == 3]
    assert set(at3["policy"]) == {"gate_lookahead", "oracle"}
    assert sorted(written["cache_fraction"].unique()) == [0.25, 0.5, 0.75]
    report = (workdir / "eval" / "report.md").read_text()
    assert "## Prefetch simulation: switch-base-8 experts on rtx3090" in report and "| oracle |" in report
    for name in ("latency_breakdown.png", "cache_sweep.png"):
        assert (workdir / "eval" / "figures" / name).stat().st_size > 0


def test_bounds_hold_and_the_oracle_is_never_slower_than_a_realizable_policy(simulated):
    _, frame = simulated
    assert (frame["ms_per_token"] >= frame["compute_ms"] - 1e-12).all()  # no stall is the floor
    assert (frame["ms_per_token"] >= frame["compute_ms"].min() - 1e-12).all()
    assert (frame["ms_per_token"] >= frame["bound_ms"] - 1e-12).all()  # the overlap bound holds for every policy
    for fraction, rows in frame.groupby("cache_fraction"):
        on_demand = rows[rows["policy"] == "on_demand"].set_index("eviction")["ms_per_token"]
        assert on_demand["belady"] <= on_demand.min() + 1e-12, fraction
        realizable = rows[~rows["policy"].isin(["oracle"]) & rows["eviction"].isin(REALIZABLE_EVICTIONS)]
        for (eviction, lookahead), group in realizable[realizable["lookahead"] > 0].groupby(["eviction", "lookahead"]):
            oracle = rows[(rows["policy"] == "oracle") & (rows["eviction"] == eviction)
                          & (rows["lookahead"] == lookahead)]["ms_per_token"].item()  # fmt: skip
            assert oracle <= group["ms_per_token"].min() + 1e-12, (fraction, eviction, lookahead)
            if eviction in on_demand:  # prefetching perfectly never loses to not prefetching
                assert oracle <= on_demand[eviction] + 1e-12, (fraction, eviction, lookahead)
        oracle_best = rows[(rows["policy"] == "oracle") & (rows["eviction"] == "belady")]["ms_per_token"].min()
        assert oracle_best <= realizable["ms_per_token"].min() + 1e-12, fraction
    prefetching = frame[frame["policy"] != "on_demand"]
    assert (prefetching["bytes_moved"] >= prefetching["wasted_bytes"]).all()
    oracle = frame[frame["policy"] == "oracle"]
    assert np.allclose(oracle["oracle_gain_fraction"].dropna(), 1.0)


def test_equal_bytes_comparison_interpolates_the_fixed_budgets():
    from speculation.cache.report import equal_bytes_table

    rows = [("on_demand", "", 0, 0, 10e6, 2.0), ("predictor_topb", "ctx", 1, 2, 20e6, 1.0),
            ("predictor_topb", "ctx", 2, 2, 40e6, 1.6), ("predictor_confidence", "ctx", 2, 2, 15e6, 1.2)]  # fmt: skip
    table = pd.DataFrame(rows, columns=["policy", "predictor", "budget", "lookahead", "bytes_moved", "ms_per_token"])
    table = table.assign(cache_fraction=0.5, eviction="lru")
    # halfway between on-demand (10 MB, 2.0 ms) and top-1 (20 MB, 1.0 ms): 1.5 ms at 15 MB; the rule takes 1.2
    assert "| ctx | 1.2000 | 15.00 | 1.5000 | -0.3000 |" in equal_bytes_table(table, 0.5, 2)
