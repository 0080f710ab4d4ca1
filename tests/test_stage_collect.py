"""The collect stage (``speculation.stages.collect``) end to end on the shared tiny workdir: store contents,
resume after a crash, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_COLLECT, compose_config

from speculation.models.source import load_source_model
from speculation.stages.collect import collect
from speculation.traces import SplitWriter, TraceStore
from speculation.tracing.recorder import RoutingRecorder
from speculation.workdir import DOCUMENTS_FILE, MANIFEST_FILE, SUMMARY_FILE, Workdir


def tiny_config(workdir: Path, *extra: str):
    """The config the shared ``collected`` workdir was built with, for another workdir."""
    return compose_config("collect", [*TINY_COLLECT, f"workdir={workdir}", *extra])


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix not in (".png", ".pdf")  # figures embed the matplotlib version, not data
    }


def test_store_holds_every_split_with_consistent_geometry(collected):
    traces = Workdir(collected).traces()
    store = TraceStore.open(traces)
    assert store.splits == ["test", "train", "val"]
    assert store.num_experts == 8 and store.max_experts_per_token == 1
    assert store.layer_names == ["decoder.1", "decoder.3", "decoder.5", "decoder.7"]
    assert store.manifest.geometry["bytes_per_expert"] == 2 * 32 * 64 * 4
    assert store.manifest.hidden.layers == [0, 1, 2, 3] and store.manifest.hidden.size == 32
    for name in ("train", "val", "test"):
        split = store.split(name)
        assert 1500 <= split.num_rows < 1500 + 64  # the budget, overshot by less than one sequence
        experts = split.array("experts")
        assert experts.shape == (split.num_rows, 4, 1) and experts.min() >= 0  # top-1, no dropping
        assert split.array("hidden").shape == (split.num_rows, 4, 32)
    assert (traces / "figures" / "expert_utilisation.png").stat().st_size > 0
    assert (traces / "figures" / "expert_utilisation.pdf").read_bytes().startswith(b"%PDF")
    summary = json.loads((traces / SUMMARY_FILE).read_text())
    layer = summary["overall"]["layers"]["decoder.1"]
    assert sum(layer["expert_load"]) == pytest.approx(1.0)
    assert 1 / 8 <= layer["load_balance_score"] <= 1.0


def test_traces_are_the_models_routing_of_the_recorded_tokens(collected):
    store = TraceStore.open(Workdir(collected).traces())
    split = store.split("val")
    seq = split.array("seq")
    rows = np.flatnonzero(seq == seq[0])
    tokens = torch.from_numpy(split.rows(rows)["token"].astype(np.int64))[None]
    model = load_source_model(Workdir(collected).source_model)
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(tokens)
        fresh = recorder.collect(torch.ones_like(tokens, dtype=torch.bool))
    stored = split.rows(rows)
    assert np.array_equal(stored["experts"], fresh["experts"].astype(np.int16))
    np.testing.assert_array_equal(stored["logits"], fresh["logits"].astype(np.float16))


def test_no_document_appears_in_two_splits(collected):
    documents = pd.read_parquet(Workdir(collected).traces() / DOCUMENTS_FILE)
    assert documents.groupby("doc_id")["split"].nunique().max() == 1
    assert set(documents["split"]) == {"train", "val", "test"}


def test_rerun_reuses_everything_and_changes_no_file(workdir):
    before = file_hashes(workdir / "traces")
    collect(tiny_config(workdir))
    assert file_hashes(workdir / "traces") == before


def test_resume_after_a_crash_mid_split_gives_identical_files(collected, tmp_path, monkeypatch):
    workdir = tmp_path / "crashed"
    workdir.mkdir()
    shutil.copytree(collected / "source_model", workdir / "source_model")
    real_write = SplitWriter.write_shard
    calls = {"n": 0}

    def crash_on_third_shard(self, index, arrays):
        calls["n"] += 1
        if calls["n"] == 3:
            (self.directory / f"shard-{index:05d}.tmp").mkdir()  # a half-written shard left behind
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, index, arrays)

    monkeypatch.setattr(SplitWriter, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny_config(workdir))
    assert not (workdir / "traces" / MANIFEST_FILE).exists()  # an interrupted store never looks complete
    with pytest.raises(FileNotFoundError, match="spec-collect"):
        TraceStore.open(workdir / "traces")
    monkeypatch.setattr(SplitWriter, "write_shard", real_write)
    collect(tiny_config(workdir))
    assert file_hashes(workdir / "traces") == file_hashes(collected / "traces")


def test_traces_of_another_config_are_refused(workdir):
    with pytest.raises(ValueError, match=r"different model or trace config \(differs in: trace.seq_len\)"):
        collect(tiny_config(workdir, "trace.seq_len=32"))


def test_empty_corpus_is_one_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "blank.txt").write_text("   \n")
    workdir = tmp_path / "work"
    with pytest.raises(ValueError, match=r"blank|no documents|empty") as err:
        collect(tiny_config(workdir, "corpus=text_files", f"corpus.glob={tmp_path}/docs/*.txt"))
    assert "\n" not in str(err.value)
    assert not (workdir / "traces" / MANIFEST_FILE).exists()


def test_split_too_small_for_a_split_is_a_clear_error(tmp_path, monkeypatch):
    # A relative glob keeps the document id ("docs/one.txt") and so its split fixed: it hashes into train,
    # leaving val empty. An absolute tmp path would move it to a random split on every run.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("def f():\n    return 1\n" * 50)
    with pytest.raises(ValueError, match="split 'val' is empty"):
        collect(tiny_config(tmp_path / "work", "corpus=text_files", "corpus.glob=docs/*.txt"))


def test_a_source_model_trained_elsewhere_traces_another_corpus_where_its_predictors_score(trained, tmp_path):
    """``model.source_workdir``: the embedded model and tokenizer of another workdir traced on this corpus. The
    model identity (the traces' fingerprint) is the same, the corpus is not, and the other workdir's predictors
    are evaluated on these traces as they are (out of domain)."""
    from speculation.stages.evaluate import evaluate
    from speculation.workdir import METRICS_CSV, REPORT_FILE

    other = tmp_path / "other"
    overrides = [*TINY_COLLECT, "corpus.max_documents=30", f"model.source_workdir={trained}", f"workdir={other}"]
    collect(compose_config("collect", overrides))
    source, traced = TraceStore.open(Workdir(trained).traces()), TraceStore.open(Workdir(other).traces())
    assert traced.manifest.fingerprint() == source.manifest.fingerprint()
    assert traced.manifest.raw["corpus"]["fingerprint"] != source.manifest.raw["corpus"]["fingerprint"]
    assert traced.manifest.raw["model"]["trained_on_corpus"] == source.manifest.raw["corpus"]["fingerprint"]
    assert not (other / "source_model").exists()  # nothing trained here
    shutil.copytree(trained / "predictors", other / "predictors")
    evaluate(compose_config("evaluate", ["logger=none", "sim.enabled=false", "eval.bootstrap=20", f"workdir={other}"]))
    scored = pd.read_csv(Workdir(other).eval() / METRICS_CSV)
    assert {"contextual-seed0", "transformer-seed0", "hierarchical-seed0", "probe-seed0"} <= set(scored["method"])
    report = (Workdir(other).eval() / REPORT_FILE).read_text()
    section = report.split("## In domain vs out of domain")[1].split("##")[0]
    assert section.count("| out of domain |") == 4 and "| in domain |" not in section


def test_a_source_workdir_without_a_model_is_one_clear_error(tmp_path):
    overrides = [*TINY_COLLECT, f"model.source_workdir={tmp_path / 'nowhere'}", f"workdir={tmp_path / 'work'}"]
    with pytest.raises(ValueError, match=r"model.source_workdir=.*nowhere holds no trained source model"):
        collect(compose_config("collect", overrides))


def test_the_bytes_per_token_formula_is_what_a_written_store_holds(collected):
    from speculation.traces.sizes import KNOWN_GEOMETRIES, TraceGeometry, bytes_per_token

    store = TraceStore.open(Workdir(collected).traces())
    split = store.split("test")
    measured = {field: split.array(field).nbytes / split.num_rows for field in split.fields}
    manifest = store.manifest
    geometry = TraceGeometry("smoke", manifest.num_layers, manifest.num_experts,
                             manifest.routing.max_experts_per_token, manifest.hidden.size)  # fmt: skip
    computed = bytes_per_token(geometry, hidden_layers=len(manifest.hidden.layers))
    assert computed == {**measured, "total": sum(measured.values())}
    mixtral = next(g for g in KNOWN_GEOMETRIES if g.name == "mixtral-8x7b")
    # by hand: experts + gates 2 x 32 x 2 x 2 B, dropped 64 B, logits 32 x 8 x 2 B, 4 int32 columns;
    # hidden 32 x 4096 x 2 B
    assert bytes_per_token(mixtral, hidden_layers=0)["total"] == 256 + 64 + 512 + 16 == 848
    assert bytes_per_token(mixtral)["total"] == 848 + 262_144
