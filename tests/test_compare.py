"""``spec-compare``: evaluated workdirs and a real Hydra multirun side by side (``speculation.stages.compare``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_SIM

from speculation.errors import UserError
from speculation.stages.compare import cli, compare, config_value, differing_keys, spread_table, write_comparison

IDENTITY = ["workdir", "model", "router", "corpus", "corpus_fingerprint", "corpus_documents", "traces_fingerprint"]
PER_ROW = ["method", "seeds", "role", "kind", "lookahead", "top1_acc", "recall_at_budget", "miss_top1_acc", "ece", "kl"]
SIM = ["sim_best_policy", "sim_best_ms_per_token", "sim_best_speedup_vs_on_demand", "sim_best_oracle_gain_fraction",
       "sim_on_demand_lru_ms_per_token", "sim_oracle_lru_ms_per_token"]  # fmt: skip


@pytest.fixture(scope="module")
def budget_sweep(evaluated, tmp_path_factory) -> Path:
    """``spec-evaluate -m eval.prefetch_budget=1,2`` into two copies of the evaluated workdir, named by a Hydra
    interpolation (``job${hydra:job.num}``) that spec-compare must resolve: a multirun dir."""
    base = tmp_path_factory.mktemp("sweep")
    for job in (0, 1):
        shutil.copytree(evaluated[0], base / f"job{job}")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "evaluate.main", "-m", f"workdir={base}/job${{hydra:job.num}}",
               "eval.prefetch_budget=1,2", "logger=none", *TINY_SIM, f"hydra.sweep.dir={base}/multirun"]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).parents[1], capture_output=True)
    return base / "multirun"


def test_a_multirun_compares_its_jobs_with_the_swept_key_as_a_column(budget_sweep, tmp_path):
    frame = compare([budget_sweep])
    assert frame.attrs["differing_keys"] == ["eval.prefetch_budget"]
    assert set(IDENTITY + PER_ROW + SIM + ["eval.prefetch_budget"]) <= set(frame.columns)
    assert sorted(frame["eval.prefetch_budget"].unique()) == [1, 2] and frame["workdir"].nunique() == 2
    assert frame["router"].unique().tolist() == ["linear-top1"] and (frame["role"] == "trained").any()
    recall = frame[frame["method"] == "frequency"].groupby("eval.prefetch_budget")["recall_at_budget"].mean()
    assert recall[2] > recall[1]  # the swept key really changed what was measured
    paths = write_comparison(frame, tmp_path / "cmp")
    assert {p.suffix for p in paths.values()} == {".csv", ".md", ".png", ".pdf"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert len(pd.read_csv(paths["csv"])) == len(frame)
    markdown = paths["markdown"].read_text()
    assert "`eval.prefetch_budget`" in markdown and "best trained top-1 d=1" in markdown
    assert "## Spread over the workdirs" in markdown


def test_the_spread_of_a_headline_over_workdirs_is_its_mean_sd_min_and_max():
    headline = pd.DataFrame({"workdir": ["a", "b", "c"], "source_train.seed": [0, 1, 2],
                             "gate_lookahead top-1 d=1": [0.70, 0.74, 0.78],
                             "best trained d=1": ["x", "y", "x"]})  # fmt: skip
    spread = spread_table(headline.drop(columns="source_train.seed")).set_index("headline")
    assert list(spread.index) == ["gate_lookahead top-1 d=1"]  # text columns have no spread
    assert spread.loc["gate_lookahead top-1 d=1"].tolist() == pytest.approx([0.74, 0.04, 0.70, 0.78])


def test_workdirs_compare_directly_and_bad_paths_are_one_clear_error(evaluated, tmp_path, capsys):
    frame = compare([evaluated[0], evaluated[0]])
    assert frame.attrs["differing_keys"] == [] and frame["sim_best_ms_per_token"].notna().all()
    with pytest.raises(UserError, match="neither a workdir"):
        compare([tmp_path])
    with pytest.raises(SystemExit):
        cli([str(tmp_path), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is neither a workdir")
    assert not (tmp_path / "out").exists()  # nothing written for a refused request


def test_a_null_config_value_is_a_value_of_its_own_not_nan():
    # router=top1 vs router=capacity: capacity_factor null vs 1.25; a key only one config has is "" elsewhere
    configs = [{"router.capacity_factor": None, "router.k": 1}, {"router.capacity_factor": 1.25, "router.k": 1,
                                                                  "extra": 3}]  # fmt: skip
    assert differing_keys(configs) == ["extra", "router.capacity_factor"]
    assert [config_value(c, "router.capacity_factor") for c in configs] == ["null", 1.25]
    assert config_value(configs[0], "extra") == ""
