"""Corpus loading, hash splits and fingerprints."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from speculation.config import CorpusConfig, CorpusKind
from speculation.corpus import (
    DatasetUnavailableError,
    Document,
    assign_split,
    corpus_fingerprint,
    load_documents,
    split_documents,
)

IDS = [f"pkg/module_{i}.py" for i in range(2000)]


def _text_cfg(pattern: str, **kwargs) -> CorpusConfig:
    return CorpusConfig(kind=CorpusKind.text_files, glob=pattern, **kwargs)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- splits ------------------------------------------------------------------------------------------------


def test_assign_split_is_deterministic_and_salted():
    first = [assign_split(i, 0.1, 0.2, "salt") for i in IDS]
    assert first == [assign_split(i, 0.1, 0.2, "salt") for i in IDS]
    assert first != [assign_split(i, 0.1, 0.2, "other salt") for i in IDS]


def test_split_fractions_roughly_respected():
    splits = [assign_split(i, 0.1, 0.2, "salt") for i in IDS]
    # binomial std for n=2000, p=0.2 is ~18 documents; 5 std of slack keeps this from flaking
    assert abs(splits.count("test") - 400) < 90
    assert abs(splits.count("val") - 200) < 70
    assert splits.count("train") == 2000 - splits.count("test") - splits.count("val")
    assert set(assign_split(i, 0.0, 0.0, "salt") for i in IDS) == {"train"}


def test_split_documents_partitions_and_is_independent_of_other_documents():
    cfg = CorpusConfig(val_fraction=0.1, test_fraction=0.1)
    docs = [Document(i, "x") for i in IDS]
    splits = split_documents(docs, cfg)
    assert set(splits) == {"train", "val", "test"}
    ids = [d.doc_id for part in splits.values() for d in part]
    assert sorted(ids) == sorted(IDS)  # every document exactly once
    assert all(len(part) > 0 for part in splits.values())
    for part in splits.values():  # order preserved
        assert [d.doc_id for d in part] == sorted((d.doc_id for d in part), key=IDS.index)

    # adding and removing documents moves no other document
    extended = split_documents([Document("new.py", "y"), *docs[::2]], cfg)
    where = {d.doc_id: name for name, part in splits.items() for d in part}
    assert all(where[d.doc_id] == name for name, part in extended.items() for d in part if d.doc_id != "new.py")


def test_split_documents_empty_splits_present():
    splits = split_documents([Document("a", "x")], CorpusConfig(val_fraction=0.0, test_fraction=0.0))
    assert splits == {"train": [Document("a", "x")], "val": [], "test": []}


def test_fingerprint_changes_with_text_ids_and_split_settings():
    cfg = CorpusConfig()
    docs = [Document("a", "alpha"), Document("b", "beta")]
    base = corpus_fingerprint(cfg, docs)
    assert base == corpus_fingerprint(CorpusConfig(), list(docs))
    assert len(base) == 64
    assert base != corpus_fingerprint(cfg, [Document("a", "alpha"), Document("b", "beta!")])
    assert base != corpus_fingerprint(cfg, [Document("a", "alpha"), Document("c", "beta")])
    assert base != corpus_fingerprint(cfg, docs[:1])
    assert base != corpus_fingerprint(CorpusConfig(split_salt="other"), docs)
    assert base != corpus_fingerprint(CorpusConfig(val_fraction=0.2), docs)


# ---- text_files --------------------------------------------------------------------------------------------


def test_text_files_sorted_truncated_empty_dropped(tmp_path):
    _write(tmp_path / "b.txt", "bravo text")
    _write(tmp_path / "a.txt", "alpha text")
    _write(tmp_path / "sub" / "c.txt", "charlie text")
    _write(tmp_path / "empty.txt", "  \n\t ")
    _write(tmp_path / "other.md", "not matched")
    (tmp_path / "dir.txt").mkdir()  # a directory that matches the glob is skipped

    docs = load_documents(_text_cfg(str(tmp_path / "**" / "*.txt")))
    assert [Path(d.doc_id).name for d in docs] == ["a.txt", "b.txt", "c.txt"]
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs)
    assert docs[0].doc_id == str(tmp_path / "a.txt")  # the path as matched
    assert docs[0].text == "alpha text"

    short = load_documents(_text_cfg(str(tmp_path / "**" / "*.txt"), max_documents=2, max_document_chars=5))
    assert [(Path(d.doc_id).name, d.text) for d in short] == [("a.txt", "alpha"), ("b.txt", "bravo")]


def test_files_that_are_not_utf8_text_are_skipped_with_a_count(tmp_path, caplog):
    _write(tmp_path / "good.txt", "plain text")
    (tmp_path / "latin1.txt").write_bytes(b"ok \xff\xfe end")  # not UTF-8
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # a NUL byte: binary
    with caplog.at_level("WARNING", logger="speculation.corpus"):
        [doc] = load_documents(_text_cfg(str(tmp_path / "*.txt")))
    assert doc.text == "plain text"
    assert "skipped 2 of 3 files that are not UTF-8 text" in caplog.text and "image.txt" in caplog.text
    (tmp_path / "good.txt").unlink()
    with pytest.raises(ValueError, match=r"No non-empty documents in corpus.glob=.*check that the files are UTF-8"):
        load_documents(_text_cfg(str(tmp_path / "*.txt")))


def test_text_files_no_match_names_glob(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.rst")
    with pytest.raises(ValueError, match="matched no files") as info:
        load_documents(_text_cfg(pattern))
    assert pattern in str(info.value)


def test_text_files_all_empty_names_source(tmp_path):
    _write(tmp_path / "a.txt", "\n\n")
    with pytest.raises(ValueError, match="No non-empty documents") as info:
        load_documents(_text_cfg(str(tmp_path / "*.txt")))
    assert str(tmp_path) in str(info.value)


# ---- stdlib ------------------------------------------------------------------------------------------------


def test_stdlib_returns_real_files_with_relative_ids():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = load_documents(CorpusConfig(max_documents=5, max_document_chars=300))
    assert len(docs) == 5
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs)
    for doc in docs:
        assert doc.doc_id.endswith(".py") and not doc.doc_id.startswith("/") and "\\" not in doc.doc_id
        assert "site-packages" not in doc.doc_id
        assert doc.text.strip() and len(doc.text) <= 300
        assert (stdlib / doc.doc_id).read_text(encoding="utf-8", errors="replace").startswith(doc.text)


# ---- hf_dataset --------------------------------------------------------------------------------------------


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, datasets):
    """Keep datasets' cache inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def _jsonl_dir(root: Path) -> Path:
    rows = [{"text": "first doc", "n": 0}, {"text": "", "n": 1}, {"text": "third doc", "n": 2}]
    _write(root / "data" / "part.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return root / "data"


def test_hf_dataset_from_local_jsonl_dir(hf_cache, datasets):
    data = _jsonl_dir(hf_cache)
    docs = load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset=str(data)))
    assert docs == [
        Document(f"{data}:train:00000000", "first doc"),
        Document(f"{data}:train:00000002", "third doc"),  # row 1 is empty and dropped; ids keep the row index
    ]
    # a single file and a save_to_disk directory load too
    single = load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset=str(data / "part.jsonl")))
    assert [d.text for d in single] == ["first doc", "third doc"]
    saved = hf_cache / "saved"
    datasets.Dataset.from_dict({"body": ["x", "y"]}).save_to_disk(str(saved))
    docs = load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset=str(saved), text_field="body"))
    assert [d.text for d in docs] == ["x", "y"]


def test_hf_dataset_missing_text_field_lists_columns(hf_cache):
    data = _jsonl_dir(hf_cache)
    with pytest.raises(ValueError, match="'content'") as info:
        load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset=str(data), text_field="content"))
    assert "'text'" in str(info.value) and "'n'" in str(info.value)


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach 'wikitext' on the Hub"), OSError("offline")])
def test_hf_dataset_offline_is_one_clear_line(monkeypatch, datasets, error):
    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DatasetUnavailableError) as info:
        load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset="wikitext"))
    message = str(info.value)
    assert "\n" not in message
    assert "'wikitext'" in message and "local path" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


def test_hf_dataset_without_datasets_installed(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r'pip install "moe-speculation\[hf\]"') as info:
        load_documents(CorpusConfig(kind=CorpusKind.hf_dataset, dataset="wikitext"))
    assert info.value.__suppress_context__
