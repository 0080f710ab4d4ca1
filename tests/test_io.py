"""Atomic writes (``speculation.io``): a file appears under its name only complete, a failed write leaves the old
file and no temporary behind, and stale temporaries are cleaned."""

from __future__ import annotations

import pytest

from speculation.io import (
    atomic_directory,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    remove_stale_temps,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        assert tmp.name == "metrics.csv.tmp" and not path.read_text().startswith("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_text_and_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "nested" / "a.json", {"b": [1, 2]}, sort_keys=True)
    assert (tmp_path / "nested" / "a.json").read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}'
    assert len(file_sha256(tmp_path / "nested" / "a.json")) == 64


def test_a_directory_is_replaced_whole_and_only_when_complete(tmp_path):
    final = tmp_path / "shard-00000"
    with atomic_directory(final) as tmp:
        (tmp / "a.npy").write_bytes(b"1")
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "b.npy").write_bytes(b"2")
        raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["a.npy"] and not (tmp_path / "shard-00000.tmp").exists()
    with atomic_directory(final) as tmp:
        (tmp / "c.npy").write_bytes(b"3")
    assert [p.name for p in final.iterdir()] == ["c.npy"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "model.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "shard-00001.tmp").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == ["model.safetensors.tmp", "shard-00001.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
    assert remove_stale_temps(tmp_path / "missing") == []
