"""Faults and bad input, as a user meets them on the command line (issue #12's cases): each one exits non-zero
with one line on stderr that names the value or file and the fix, prints no traceback, and leaves nothing behind
that looks valid. The console scripts run in-process (``cli()`` with ``sys.argv`` set), except where a second
process is the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_COLLECT, TINY_TRAIN, copy_workdir
from safetensors.torch import load_file, save_file

import collect.main
import evaluate.main
import train.main
from speculation import cli
from speculation.io import file_sha256
from speculation.predictors import training
from speculation.traces import SplitWriter, TraceStore
from speculation.workdir import MANIFEST_FILE, PREDICTOR_FILE, REPORT_FILE, STATE_FILE, WEIGHTS_FILE, Workdir

RESUME_CHANGES = [("train.lr=0.01", "train.lr"), ("predictor.d_model=32", "predictor.d_model")]
SCRIPTS = {"spec-collect": collect.main.cli, "spec-train": train.main.cli, "spec-evaluate": evaluate.main.cli}
# How the `trained` fixture trained its contextual run; run_name keeps the command's overrides out of the name, so a
# rerun with another config meets that run (without it, another config is another run: test_stage_train.py).
TRAIN = ["experiment=smoke", *TINY_TRAIN, "predictor=contextual", "run_name=contextual-seed0"]
EVALUATE = ["logger=none", "sim.enabled=false", "eval.bootstrap=0"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


@pytest.fixture
def run(monkeypatch, capsys):
    """``run("spec-train", *overrides)``: the console script's exit code and output."""

    def run_script(script: str, *overrides: str) -> Result:
        monkeypatch.setattr(sys, "argv", [script, *overrides])
        capsys.readouterr()
        try:
            SCRIPTS[script]()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run_script


def assert_user_error(result: Result, *fragments: str) -> None:
    assert result.code == 1, result
    assert result.last_line.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.last_line, (fragment, result.last_line)
    assert "Traceback" not in result.stderr + result.stdout and "Error executing job" not in result.stderr


@pytest.fixture
def trained_copy(trained, tmp_path) -> Path:
    return copy_workdir(trained, tmp_path / "work")


def weights(workdir: Path, run: str = "contextual-seed0") -> Path:
    return Workdir(workdir).run(run) / WEIGHTS_FILE


# ---- 2: stale and broken runs are never reused silently -------------------------------------------------------


def test_a_rerun_under_another_config_refuses_and_names_the_keys(trained_copy, run):
    before = file_sha256(weights(trained_copy))
    assert run("spec-train", *TRAIN, f"workdir={trained_copy}").code == 0  # same config: reused
    result = run("spec-train", *TRAIN, f"workdir={trained_copy}", "predictor.max_lookahead=3", "train.steps=9")
    assert_user_error(
        result, str(Workdir(trained_copy).run("contextual-seed0")), "differs in: predictor.max_lookahead, train.steps",
        "run_name=NAME", "train.overwrite=true",
    )  # fmt: skip
    assert file_sha256(weights(trained_copy)) == before


def test_a_finished_run_with_broken_weights_is_refused_until_overwritten(trained_copy, run):
    path = weights(trained_copy)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])  # truncated
    assert_user_error(
        run("spec-train", *TRAIN, f"workdir={trained_copy}"), f"{path} is corrupted", "train.overwrite=true"
    )
    assert_user_error(run("spec-evaluate", *EVALUATE, f"workdir={trained_copy}"), f"{path} is corrupted")
    assert not Workdir(trained_copy).eval().exists()
    assert run("spec-train", *TRAIN, f"workdir={trained_copy}", "train.overwrite=true").code == 0
    assert path.read_bytes() == original  # retrained from scratch: the same weights, bit for bit


@pytest.mark.parametrize(
    ("override", "key"), [("train.lr=0.01", "train.lr"), ("predictor.d_model=32", "predictor.d_model")]
)
def test_a_resume_under_another_config_refuses_and_keeps_the_checkpoint(workdir, run, monkeypatch, override, key):
    real_batch = training.WindowSource.batch
    calls = {"n": 0}

    def killed_at_the_seventh_batch(self, indices):
        calls["n"] += 1
        if calls["n"] == 7 + 1:  # + the validation batch at step 4
            raise KeyboardInterrupt
        return real_batch(self, indices)

    monkeypatch.setattr(training.WindowSource, "batch", killed_at_the_seventh_batch)
    killed = run("spec-train", *TRAIN, f"workdir={workdir}")
    assert killed.code == 130 and "run the same command again to resume" in killed.last_line
    state = Workdir(workdir).run("contextual-seed0") / STATE_FILE
    assert state.exists()
    monkeypatch.setattr(training.WindowSource, "batch", real_batch)
    assert_user_error(run("spec-train", *TRAIN, f"workdir={workdir}", override), f"differs in: {key}")
    assert state.exists() and not (state.parent / PREDICTOR_FILE).exists()
    assert run("spec-train", *TRAIN, f"workdir={workdir}").code == 0 and not state.exists()


# ---- 3: predictors of another model are not scored -------------------------------------------------------------


def test_predictors_of_another_source_model_are_refused_and_of_the_same_one_accepted(trained_copy, run):
    wd = Workdir(trained_copy)
    collect_args = [*TINY_COLLECT, f"workdir={trained_copy}"]
    for steps, accepted in (("source_train.steps=7", False), ("source_train.steps=6", True)):
        shutil.rmtree(wd.source_model)
        shutil.rmtree(wd.traces())
        assert run("spec-collect", *collect_args, steps).code == 0  # same corpus, same name and shape
        result = run("spec-evaluate", *EVALUATE, f"workdir={trained_copy}")
        if accepted:  # the same config trains the same weights: the same model, its predictors are valid
            assert result.code == 0, result.stderr
        else:
            assert_user_error(result, str(wd.run("contextual-seed0")), "trained on traces of another model")
            assert not wd.eval().exists()


# ---- 4: one writer per workdir ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from speculation.locks import locked
with locked(sys.argv[1], "x", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_a_second_collection_refuses_at_once_naming_the_holder(workdir, run, mode):
    lock = Workdir(workdir).lock("traces")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run("spec-collect", *TINY_COLLECT, f"workdir={workdir}")
        who = f"pid {holder.pid}" if mode == "exclusive" else "another process reading it"
        assert_user_error(
            result, f"cannot lock the traces of {workdir}: it is in use by {who}", "wait for it to finish"
        )
        if mode == "shared":  # readers share the traces: a training run goes ahead
            assert run("spec-train", *TRAIN, f"workdir={workdir}").code == 0
    finally:
        holder.kill()
        holder.wait()
    assert run("spec-collect", *TINY_COLLECT, f"workdir={workdir}").code == 0  # the kernel dropped the lock


def test_a_shard_whose_files_do_not_match_its_marker_is_traced_again(workdir, run):
    traces = Workdir(workdir).traces()
    victim = traces / "train" / "shard-00000" / "hidden.npy"
    original = file_sha256(victim)
    victim.unlink()
    (traces / MANIFEST_FILE).unlink()
    assert run("spec-collect", *TINY_COLLECT, f"workdir={workdir}").code == 0
    assert file_sha256(victim) == original
    TraceStore.open(traces)  # every shard hashes to its manifest entry


# ---- 5: predictor files are checked ----------------------------------------------------------------------------


def _rewrite_weights(run_dir: Path, data: bytes | None = None, tensors: dict | None = None) -> None:
    """New weights with a consistent checksum in predictor.json (so the content check is what must catch them)."""
    path = run_dir / WEIGHTS_FILE
    if tensors is not None:
        save_file(tensors, path)
    else:
        path.write_bytes(data)
    meta = json.loads((run_dir / PREDICTOR_FILE).read_text())
    (run_dir / PREDICTOR_FILE).write_text(json.dumps(meta | {"weights_sha256": file_sha256(path)}))


def _nan_weights(run_dir: Path) -> None:
    tensors = load_file(run_dir / WEIGHTS_FILE)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    _rewrite_weights(run_dir, tensors=tensors)


BREAKAGES = {
    "garbage weights": (lambda d: _rewrite_weights(d, data=b"not a safetensors file"), "is not a readable safetensors"),
    "NaN weights": (_nan_weights, "holds NaN or inf in"),
    "missing weights": (lambda d: (d / WEIGHTS_FILE).unlink(), f"{WEIGHTS_FILE} is missing"),
    "invalid predictor.json": (lambda d: (d / PREDICTOR_FILE).write_text("{"), f"{PREDICTOR_FILE} is not valid JSON"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_predictor_stops_the_evaluation_naming_its_run(trained_copy, run, breakage):
    run_dir = Workdir(trained_copy).run("transformer-seed0")
    damage, message = BREAKAGES[breakage]
    damage(run_dir)
    assert_user_error(run("spec-evaluate", *EVALUATE, f"workdir={trained_copy}"), str(run_dir), message)
    assert not Workdir(trained_copy).eval().exists()


# ---- 6: trace content is checked when a store opens ------------------------------------------------------------


def _rewrite_experts(workdir: Path, high: int) -> None:
    """Shard 0 of train rewritten with an expert id ``high``, checksums and ranges consistent (a writer's bug)."""
    traces = Workdir(workdir).traces()
    writer = SplitWriter(traces, "train")
    arrays = {name: np.array(a) for name, a in writer.read_shard(0).items()}
    arrays["experts"][0, 0, 0] = high
    writer.write_shard(0, arrays)
    manifest = json.loads((traces / MANIFEST_FILE).read_text())
    manifest["splits"]["train"]["shards"][0] = writer.shard_info(0).to_dict()
    (traces / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_expert_ids_beyond_the_experts_are_refused_before_any_work(workdir, run):
    _rewrite_experts(workdir, high=9)  # the model has 8 experts
    message = "9], outside [-1, 7]"  # train/shard-00000 has experts values in [lo, 9], ...
    assert_user_error(run("spec-train", *TRAIN, f"workdir={workdir}"), message, "re-run spec-collect")
    assert not Workdir(workdir).predictors.exists()
    assert_user_error(run("spec-evaluate", *EVALUATE, f"workdir={workdir}"), message)
    assert not Workdir(workdir).eval().exists()


@pytest.mark.parametrize("target", ["switch_base_8", "traced"])
def test_a_manifest_without_geometry_is_refused(workdir, run, target):
    path = Workdir(workdir).traces() / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["geometry"]
    path.write_text(json.dumps(manifest))
    result = run("spec-evaluate", *EVALUATE, f"workdir={workdir}", f"target={target}")
    assert_user_error(result, f"{path}: the top level: 'geometry' is a required property", "re-run spec-collect")


# ---- 7: input that is not text, a model that learned nothing ---------------------------------------------------


def test_a_corpus_of_binary_files_is_refused(tmp_path, run):
    for i in range(3):
        (tmp_path / f"blob{i}.txt").write_bytes(bytes(range(256)) * 4)
    result = run("spec-collect", *TINY_COLLECT, f"workdir={tmp_path / 'work'}", "corpus=text_files",
                 f"corpus.glob={tmp_path}/*.txt")  # fmt: skip
    assert_user_error(result, "No non-empty documents in corpus.glob=", "UTF-8 text")
    assert not (tmp_path / "work" / "source_model").exists()


def test_a_source_model_that_does_not_beat_unigram_is_not_traced(tmp_path, run):
    workdir = tmp_path / "work"
    result = run("spec-collect", *TINY_COLLECT, "source_train.require_beats_unigram=true", "source_train.steps=1",
                 f"workdir={workdir}")  # fmt: skip
    assert_user_error(result, "does not beat the unigram baseline", "source_train.steps")
    assert not (Workdir(workdir).traces() / MANIFEST_FILE).exists()


# ---- 8: user errors are one line, bugs keep their traceback ----------------------------------------------------


@pytest.mark.parametrize(
    ("script", "overrides", "fragments"),
    [
        ("spec-train", ["seed=-1"], ["seed=-1 must be a non-negative integer"]),
        ("spec-train", ["train.stepz=3"], ["Could not override 'train.stepz'", "full_key: train.stepz"]),
        ("spec-train", ["train.steps=abc"], ["Value 'abc' of type 'str' could not be converted to Integer"]),
        ("spec-train", ["device=tpu"], ["device='tpu' is not auto, cpu or cuda[:N]"]),
        ("spec-evaluate", ["eval.split=nope"], ["eval.split='nope' is not in"]),
        ("spec-collect", ["corpus=text_files", "corpus.glob=/nowhere/*.txt"], ["matched no files"]),
    ],
)
def test_user_errors_are_one_line_and_leave_no_run_behind(workdir, run, script, overrides, fragments):
    assert_user_error(run(script, "logger=none", f"workdir={workdir}", *overrides), *fragments)
    assert not Workdir(workdir).predictors.exists() and not Workdir(workdir).eval().exists()


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_user_error(run("spec-train", "logger=none", f"workdir={blocker}/work"), f"cannot use {blocker}/work")


def test_bugs_keep_their_traceback_and_hydra_full_error_keeps_every_one(workdir, run, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("speculation.stages.train.train_predictor", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run("spec-train", *TRAIN, f"workdir={workdir}")
    monkeypatch.setattr(cli, "_user_wants_tracebacks", True)
    with pytest.raises(ValueError, match="seed=-1"):
        run("spec-train", "logger=none", f"workdir={workdir}", "seed=-1")


def test_the_installed_console_script_prints_one_line(tmp_path):
    script = Path(sys.executable).parent / "spec-train"
    done = subprocess.run(
        [str(script), f"workdir={tmp_path}", "logger=none", "seed=-1"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: seed=-1 must be a non-negative integer (a random seed)."


# ---- 9: late errors --------------------------------------------------------------------------------------------


def test_a_lookahead_the_traces_cannot_serve_fails_before_any_work(trained_copy, run):
    result = run("spec-evaluate", "logger=none", f"workdir={trained_copy}", "sim.lookaheads=[4]",
                 "sim.headline_lookahead=4")  # fmt: skip
    assert_user_error(result, "sim.lookaheads has [4] but the traces have 4 MoE layers", "drop those lookaheads")
    assert not Workdir(trained_copy).eval().exists() and "metrics" not in result.stdout


def test_a_predictor_of_shorter_reach_is_named_in_the_report(evaluated):
    workdir, _ = evaluated  # predictors reach d <= 2; eval.max_lookahead is 3
    report = (Workdir(workdir).eval() / REPORT_FILE).read_text()
    section = report.split("## Not evaluated")[1].split("\n## ")[0]
    for name in ("contextual-seed0", "hierarchical-seed0", "probe-seed0", "transformer-seed0"):
        assert f"**{name} at d > 2**: it predicts lookaheads 1..2 only, so it has no metrics rows at d = [3]" in section
    assert "predictor.max_lookahead=3" in section
