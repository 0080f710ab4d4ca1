"""The evaluate stage (``speculation.stages.evaluate``) on the shared trained workdir: every file it writes, the
trained predictors scored next to the baselines, and the config's rules checked before any work."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import compose_config

from speculation.evaluation.tables import read_metrics
from speculation.stages.evaluate import evaluate
from speculation.workdir import METRICS_JSON, PREDICTOR_FILE, REPORT_FILE, SIMULATION_CSV, Workdir

BASELINES = ["random", "frequency", "previous_token", "layer_minus_1", "multi_layer", "pattern", "adaptive",
             "gate_lookahead", "oracle"]  # fmt: skip
TRAINED = ["contextual-seed0", "hierarchical-seed0", "probe-seed0", "transformer-seed0"]


def test_spec_evaluate_writes_every_file(evaluated):
    workdir, out = evaluated
    eval_dir = Workdir(workdir).eval()
    frame, _ = read_metrics(eval_dir)
    assert list(dict.fromkeys(frame["method"])) == BASELINES + TRAINED
    identity = frame[["model", "router", "corpus", "split", "workdir"]].drop_duplicates()
    assert identity.values.tolist() == [["switch-lm-smoke", "linear-top1", "stdlib", "test", str(workdir.resolve())]]
    assert frame.loc[frame["method"].isin(TRAINED), "kind"].unique().tolist() == ["contextual", "hierarchical", "probe",
                                                                                 "transformer"]  # fmt: skip
    assert frame.loc[frame["method"].isin(BASELINES), "run"].isna().all() and (frame["seeds"] == 1).all()
    required = {"method", "lookahead", "layer", "top1_acc", "top1_ci_low", "top1_ci_high", "recall_at_budget"}
    assert required | {"exact_set", "f1", "kl", "ece", "brier", "conf_corr", "change_rate", "n_tokens"} <= set(frame)
    pooled = frame[frame["pooled"]]
    assert pooled["layer"].isna().all() and frame.loc[~frame["pooled"], "layer"].notna().all()
    assert sorted(pooled["lookahead"].unique()) == [1, 2, 3]
    assert (pooled["top1_ci_low"] <= pooled["top1_acc"]).all() and (pooled["top1_acc"] <= pooled["top1_ci_high"]).all()
    assert (pooled[pooled["method"] == "oracle"]["top1_acc"] == 1.0).all()
    assert (pooled[pooled["method"] == "oracle"]["miss_top1_acc"] == 1.0).all()
    for _, cell in pooled.groupby("lookahead"):  # would-be misses do not depend on the method
        assert cell["miss_share"].between(0, 1, inclusive="right").all() and cell["miss_share"].nunique() == 1
    for name in TRAINED:  # the predictors reach d <= 2 and are scored there only
        scored = pooled[pooled["method"] == name]
        assert sorted(scored["lookahead"]) == [1, 2] and scored["top1_acc"].between(0, 1).all()
    summary = json.loads((eval_dir / METRICS_JSON).read_text())
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and "oracle/d1" in summary["reliability"]
    report = (eval_dir / REPORT_FILE).read_text()
    assert "## Lookahead d = 1" in report and "| gate_lookahead " in report
    assert report.index("## Read this first") < report.index("## Setting") < report.index("## Lookahead d = 1")
    assert "of the oracle's gain**" in report and "## Columns" in report and "KL (nats)" in report
    documents = summary["documents"]  # the tiny fixture holds a handful of test documents: the report says so
    assert documents < 20 and f"**Warning: only {documents} held-out document" in report
    assert "## Prefetch simulation: switch-base-8 experts on rtx3090" in report
    for name in ("accuracy_vs_lookahead", "reliability_d1", "layer_accuracy_d1", "latency_breakdown", "cache_sweep"):
        path = eval_dir / "figures" / f"{name}.png"
        assert path.stat().st_size > 0 and f"]({path.relative_to(eval_dir)})" in report
        assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")  # every figure also as a vector PDF
        assert summary["figures"][name] == str(path.relative_to(eval_dir))
    written = pd.read_csv(eval_dir / SIMULATION_CSV, keep_default_na=False)
    assert len(written) == len(out["simulation"]) and out["paths"]["report"] == str(eval_dir / REPORT_FILE)
    assert not list(eval_dir.rglob("*.tmp"))


def test_a_predictor_from_another_model_is_refused_before_any_scoring(trained, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "traces").symlink_to(Workdir(trained).traces(), target_is_directory=True)
    run_dir = Workdir(workdir).run("contextual-seed0")
    shutil.copytree(Workdir(trained).run("contextual-seed0"), run_dir)
    meta = json.loads((run_dir / PREDICTOR_FILE).read_text())
    (run_dir / PREDICTOR_FILE).write_text(json.dumps(meta | {"traces_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="trained on traces of another model"):
        evaluate(compose_config("evaluate", [f"workdir={workdir}", "logger=none"]))
    assert not Workdir(workdir).eval().exists()


def test_a_config_that_does_not_fit_the_traces_fails_before_any_work(collected, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "traces").symlink_to(Workdir(collected).traces(), target_is_directory=True)
    overrides = [f"workdir={workdir}", "logger=none", "eval.max_lookahead=4", "sim.lookaheads=[2,4]",
                 "sim.cache_fractions=[0.01,0.5]"]  # fmt: skip
    with pytest.raises(ValueError) as err:
        evaluate(compose_config("evaluate", overrides))
    message = str(err.value)  # every problem in one error, each naming its key and the fix
    assert "the config does not fit the traces" in message and message.count("\n- ") == 3
    assert "eval.max_lookahead=4 but the traces have 4 MoE layers" in message and "set eval.max_lookahead=3" in message
    assert "sim.lookaheads has [4]" in message and "sim.cache_fractions has 0.01" in message
    assert not Workdir(workdir).eval().exists()
    with pytest.raises(ValueError, match=r"eval.split='val2' is not in"):
        evaluate(compose_config("evaluate", [f"workdir={workdir}", "logger=none", "eval.split=val2"]))
