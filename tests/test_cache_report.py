"""The simulation's results (``speculation.cache.report`` and ``tables``) on the shared evaluated workdir: every
policy and column in simulation.csv, the bounds hold, the oracle is never beaten, and the report's tables are
the seed-averaged frame's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from speculation.cache import tables
from speculation.cache.report import render_equal_bytes
from speculation.evaluation.report import IDENTITY
from speculation.workdir import REPORT_FILE, SIMULATION_CSV, Workdir

REALIZABLE_EVICTIONS = ["lru", "lfu", "predicted", "expected"]


def test_simulation_csv_has_every_policy_and_column(evaluated):
    workdir, out = evaluated
    frame = out["simulation"]
    written = pd.read_csv(Workdir(workdir).eval() / SIMULATION_CSV, keep_default_na=False)
    required = {"policy", "eviction", "hardware", "target", "cache_fraction", "lookahead", "ms_per_token",
                "stall_ms_per_token", "hit_rate", "bytes_moved_per_token", "wasted_bytes_per_token",
                "speedup_vs_on_demand", "oracle_gain_fraction"}  # fmt: skip
    assert required <= set(written.columns) and len(written) == len(frame)
    metrics = pd.read_csv(Workdir(workdir).eval() / "metrics.csv")
    assert list(written.columns[: len(IDENTITY)]) == IDENTITY  # first, as in metrics.csv
    identity = ["model", "router", "corpus", "corpus_fingerprint", "traces_fingerprint", "split", "workdir"]
    assert written[identity].drop_duplicates().astype(str).values.tolist() == (
        metrics[identity].drop_duplicates().astype(str).values.tolist()
    )  # simulation.csv joins metrics.csv on the same identity
    kinds = written.drop_duplicates("predictor").set_index("predictor")["predictor_kind"].to_dict()
    assert kinds["transformer-seed0"] == "transformer" and kinds["gate_lookahead"] == "gate_lookahead"
    assert kinds[""] == ""  # on-demand and the oracle use no predictor
    assert set(written["policy"]) == {"on_demand", "gate_lookahead", "predictor_topb", "predictor_confidence",
                                      "cost_aware", "cost_aware_multi", "oracle"}  # fmt: skip
    assert set(written[written["policy"] == "predictor_topb"]["predictor"]) == {
        "contextual-seed0", "transformer-seed0", "hierarchical-seed0", "probe-seed0",
    }  # fmt: skip
    # the predictors reach d <= 2: no predictor rows at lookahead 3, gate-lookahead and the oracle still there
    at3 = written[written["lookahead"] == 3]
    assert set(at3["policy"]) == {"gate_lookahead", "cost_aware", "cost_aware_multi", "oracle"}
    assert set(at3[at3["policy"].str.startswith("cost_aware")]["predictor"]) == {"gate_lookahead"}
    assert sorted(written["cache_fraction"].unique()) == [0.25, 0.5, 0.75]


def test_bounds_hold_and_the_oracle_is_never_slower_than_a_realizable_policy(evaluated):
    frame = evaluated[1]["simulation"]
    assert (frame["ms_per_token"] >= frame["compute_ms_per_token"] - 1e-12).all()  # no stall is the floor
    assert (frame["ms_per_token"] >= frame["compute_ms_per_token"].min() - 1e-12).all()
    assert (frame["ms_per_token"] >= frame["bound_ms_per_token"] - 1e-12).all()  # the overlap bound holds for all
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
    assert (prefetching["bytes_moved_per_token"] >= prefetching["wasted_bytes_per_token"]).all()
    oracle = frame[frame["policy"] == "oracle"]
    assert np.allclose(oracle["oracle_gain_fraction"].dropna(), 1.0)


def test_equal_bytes_comparison_interpolates_the_fixed_budgets():
    rows = [("on_demand", "", 0, 0, 10e6, 2.0), ("predictor_topb", "ctx", 1, 2, 20e6, 1.0),
            ("predictor_topb", "ctx", 2, 2, 40e6, 1.6), ("predictor_confidence", "ctx", 2, 2, 15e6, 1.2)]  # fmt: skip
    columns = ["policy", "predictor", "budget", "lookahead", "bytes_moved_per_token", "ms_per_token"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.assign(cache_fraction=0.5, eviction="lru")
    # halfway between on-demand (10 MB, 2.0 ms) and top-1 (20 MB, 1.0 ms): 1.5 ms at 15 MB; the rule takes 1.2
    (row,) = tables.equal_bytes(table, 0.5, 2).to_dict(orient="records")
    assert row == pytest.approx({"predictor": "ctx", "confidence_ms": 1.2, "bytes_moved_per_token": 15e6,
                                 "fixed_ms_at_equal_bytes": 1.5, "difference_ms": -0.3})  # fmt: skip
    assert "| ctx         | 1.2000                 | 15.00            | 1.5000" in render_equal_bytes(
        tables.equal_bytes(table, 0.5, 2)
    )


def test_the_reports_tables_come_from_the_seed_averaged_frame(evaluated):
    workdir, out = evaluated
    table = tables.seed_groups(out["simulation"])
    assert set(table["predictor"]) == {"", "gate_lookahead", "contextual", "hierarchical", "probe", "transformer"}
    bounds = tables.bounds(table, 2).set_index("cache_fraction")
    assert list(bounds.index) == [0.25, 0.5, 0.75]
    assert (bounds["bound_overlap"] <= bounds["oracle_belady"] + 1e-12).all()
    assert (bounds["bound_on_demand_belady"] <= bounds["on_demand_lru"] + 1e-12).all()
    headline = tables.headline(table, 0.5, 2)
    assert set(headline["lookahead"]) == {0, 2} and (headline["cache_fraction"] == 0.5).all()
    sweep = tables.sweep(table, 2)
    assert list(sweep.columns) == [0.25, 0.5, 0.75] and ("on_demand", "", 1, "lru", 0) in sweep.index
    report = (Workdir(workdir).eval() / REPORT_FILE).read_text()
    for _, row in headline.iterrows():  # every headline row is in the report, with its ms/token
        assert f"{row['ms_per_token']:.3f}" in report


def test_an_on_demand_headline_gets_a_share_of_the_oracle_at_the_headline_lookahead():
    # Hand-made: prefetching loses to on-demand LFU, whose rows sit at lookahead 0 where there is no oracle.
    rows = [("on_demand", "lru", 0, 1.0), ("on_demand", "lfu", 0, 0.9), ("oracle", "lfu", 2, 0.5),
            ("oracle", "lru", 2, 0.6), ("predictor_topb", "lru", 2, 1.1)]  # fmt: skip
    table = pd.DataFrame(
        [{"policy": p, "eviction": e, "lookahead": d, "ms_per_token": ms, "cache_fraction": 0.5, "predictor": "",
          "seeds": 1, "budget": 1, "speedup_vs_on_demand": 1.0 / ms, "oracle_gain_fraction": np.nan}
         for p, e, d, ms in rows]
    )  # fmt: skip
    numbers = tables.headline_numbers(table, 0.5, 2)
    assert numbers["best_policy"] == "on_demand/lfu" and numbers["best_eviction_oracle_ms_per_token"] == 0.5
    assert numbers["best_oracle_gain_fraction"] == pytest.approx((1.0 - 0.9) / (1.0 - 0.5))  # 0.2
