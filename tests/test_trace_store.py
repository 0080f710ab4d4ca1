import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_manifest

from speculation.traces import (
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    TRACE_FIELDS,
    ShardInfo,
    SplitWriter,
    TraceFormatError,
    TraceStore,
    write_manifest,
)

L, K, E, LH, H = 2, 2, 4, 1, 3
ROUTING = {"num_experts": E, "max_experts_per_token": K, "layers": ["layer0.router", "layer1.router"]}


def make_shard(n: int, seed: int, hidden: bool = False, first_seq: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "experts": rng.integers(-1, E, size=(n, L, K)),
        "gates": rng.random((n, L, K)).astype(np.float32),
        "logits": rng.normal(size=(n, L, E)),
        "token": rng.integers(0, 100, size=n),
        "doc": np.full(n, seed),
        "pos": np.arange(n),
        "seq": first_seq + np.arange(n) // 3,
    }
    if hidden:
        arrays["hidden"] = rng.normal(size=(n, LH, H))
        arrays["dropped"] = rng.random((n, L, K)) < 0.2  # optional fields travel together in these tests
    return arrays


def write_split(root: Path, split: str, sizes: list[int], hidden: bool, seed: int) -> tuple[dict, list[dict]]:
    writer = SplitWriter(root, split)
    shards = [make_shard(n, seed + i, hidden) for i, n in enumerate(sizes)]
    for i, arrays in enumerate(shards):
        writer.write_shard(i, arrays)
    return writer.finalize(len(sizes)), shards


def expected_field(shards: list[dict], field: str) -> np.ndarray:
    return np.concatenate([s[field] for s in shards]).astype(TRACE_FIELDS[field])


@pytest.fixture
def store_dir(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    root = tmp_path / "traces"
    train, train_shards = write_split(root, "train", [5, 3, 4], hidden=True, seed=0)
    valid, valid_shards = write_split(root, "valid", [2, 6], hidden=False, seed=10)
    write_manifest(root, synthetic_manifest(ROUTING, splits={"train": train, "valid": valid}))
    return root, {"train": train_shards, "valid": valid_shards}


def test_round_trip(store_dir):
    root, written = store_dir
    store = TraceStore.open(root)
    assert store.splits == ["train", "valid"]
    assert (store.num_experts, store.max_experts_per_token) == (E, K)
    assert store.layer_names == ROUTING["layers"]
    assert store.manifest.raw["schema_version"] == SCHEMA_VERSION
    assert json.loads((root / "manifest.json").read_text()) == store.manifest.raw

    for name, shards in written.items():
        split = store.split(name)
        fields = tuple(f for f in TRACE_FIELDS if f in shards[0])
        assert split.fields == fields
        assert split.num_rows == sum(len(s["token"]) for s in shards)
        for field in fields:
            got = split.array(field)
            assert got.dtype == TRACE_FIELDS[field]
            np.testing.assert_array_equal(got, expected_field(shards, field))
        for got_shard, shard in zip(split.iter_shards(), shards, strict=True):
            for field in fields:
                np.testing.assert_array_equal(got_shard[field], shard[field].astype(TRACE_FIELDS[field]))

        # Shuffled indices with repeats, spanning every shard.
        idx = np.random.default_rng(1).permutation(np.r_[np.arange(split.num_rows), 0, split.num_rows - 1])
        gathered = split.rows(idx)
        for field in fields:
            np.testing.assert_array_equal(gathered[field], expected_field(shards, field)[idx])
        assert split.rows(idx, fields=["pos"]).keys() == {"pos"}

        frame = split.tokens_frame()
        assert list(frame.columns) == ["row", "doc", "pos", "seq", "token"]
        np.testing.assert_array_equal(frame["row"], np.arange(split.num_rows))
        for column in ("doc", "pos", "seq", "token"):
            np.testing.assert_array_equal(frame[column], expected_field(shards, column))


def test_shard_info_and_meta(store_dir):
    root, _ = store_dir
    writer = SplitWriter(root, "train")
    info = writer.shard_info(1)
    assert info.name == "shard-00001" and info.rows == 3
    assert set(info.sha256) == {f"{f}.npy" for f in TRACE_FIELDS if f != "lookahead_logits"}  # make_shard's fields
    assert ShardInfo.from_dict(info.to_dict()) == info
    meta = json.loads((root / "train" / "shard-00001" / "meta.json").read_text())
    sizes = {name: (root / "train" / "shard-00001" / name).stat().st_size for name in info.sha256}
    assert meta == {"rows": 3, "sha256": info.sha256, "ranges": info.ranges, "bytes": sizes}
    assert (info.ranges["doc"], info.ranges["pos"], info.ranges["seq"]) == ([1, 1], [0, 2], [0, 0])  # make_shard(3, 1)
    assert writer.is_complete(2) and not writer.is_complete(3)


def test_a_shard_whose_files_do_not_match_its_marker_is_not_complete(store_dir):
    root, _ = store_dir
    writer = SplitWriter(root, "train")
    shard = root / "train" / "shard-00001"
    (shard / "logits.npy").write_bytes((shard / "logits.npy").read_bytes()[:-8])  # truncated after the marker
    assert writer.is_complete(0) and not writer.is_complete(1)
    (shard / "hidden.npy").unlink()
    assert not writer.is_complete(1)
    writer.write_shard(1, make_shard(3, 1, hidden=True))  # the next collection rewrites it
    assert writer.is_complete(1)


def test_empty_shard_and_pickle(tmp_path):
    root = tmp_path / "traces"
    entry, shards = write_split(root, "test", [3, 0, 2], hidden=False, seed=3)
    write_manifest(root, synthetic_manifest(ROUTING, splits={"test": entry}))
    split = TraceStore.open(root).split("test")
    idx = np.array([4, 0, 3, 2])
    np.testing.assert_array_equal(split.rows(idx)["logits"], expected_field(shards, "logits")[idx])
    assert split.rows(np.zeros(0, np.int64))["experts"].shape == (0, L, K)
    clone = pickle.loads(pickle.dumps(split))
    np.testing.assert_array_equal(clone.array("experts"), split.array("experts"))


def test_resume_after_crash_is_byte_identical(tmp_path):
    shards = [make_shard(4, 0, hidden=True), make_shard(3, 1, hidden=True)]
    clean = SplitWriter(tmp_path / "clean", "train")
    for i, arrays in enumerate(shards):
        clean.write_shard(i, arrays)
    clean.finalize(2)

    crashed = SplitWriter(tmp_path / "crashed", "train")
    crashed.write_shard(0, shards[0])
    stale = tmp_path / "crashed" / "train" / "shard-00001.tmp"
    stale.mkdir()
    (stale / "experts.npy").write_bytes(b"\x93NUMPY garbage from a killed writer")
    assert not crashed.is_complete(1)

    resumed = SplitWriter(tmp_path / "crashed", "train")
    assert not stale.exists()
    assert resumed.is_complete(0) and not resumed.is_complete(1)
    resumed.write_shard(1, shards[1])
    resumed.finalize(2)

    clean_files = sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file())
    crashed_files = sorted(
        p.relative_to(tmp_path / "crashed") for p in (tmp_path / "crashed").rglob("*") if p.is_file()
    )
    assert clean_files == crashed_files
    assert Path("train/tokens.parquet") in clean_files
    for rel in clean_files:
        assert (tmp_path / "clean" / rel).read_bytes() == (tmp_path / "crashed" / rel).read_bytes(), rel


def test_corrupted_shard_names_file(store_dir):
    root, _ = store_dir
    path = root / "train" / "shard-00001" / "logits.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"shard-00001/logits\.npy.*delete .*shard-00001.*spec-collect"):
        TraceStore.open(root)
    TraceStore.open(root, verify=False)  # opt-out still reads


def test_missing_shard_file(store_dir):
    root, _ = store_dir
    (root / "valid" / "shard-00000" / "gates.npy").unlink()
    with pytest.raises(TraceFormatError, match=r"gates\.npy is missing"):
        TraceStore.open(root)
    with pytest.raises(TraceFormatError, match=r"gates\.npy is missing"):
        TraceStore.open(root, verify=False).split("valid")


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no trace manifest in .*spec-collect workdir=.*resumes"):
        TraceStore.open(tmp_path / "traces")


def test_other_schema_version(store_dir):
    root, _ = store_dir
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceFormatError, match=rf"version {SCHEMA_VERSION + 1}.*version {SCHEMA_VERSION}.*re-collect"):
        TraceStore.open(root)


def test_routing_geometry_mismatch(store_dir):
    root, _ = store_dir
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["routing"]["num_experts"] = E + 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceFormatError, match=r"routing.num_experts=5 but geometry.num_experts=4; delete the store"):
        TraceStore.open(root)
    manifest["geometry"]["num_experts"] = E + 1  # consistent, but not what the shards hold
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceFormatError, match=r"logits\.npy"):
        TraceStore.open(root).split("train")


def test_unknown_split_and_bad_rows(store_dir):
    root, _ = store_dir
    store = TraceStore.open(root)
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'valid'\]"):
        store.split("test")
    split = store.split("valid")
    with pytest.raises(IndexError):
        split.rows(np.array([0, split.num_rows]))
    with pytest.raises(ValueError, match="hidden"):
        split.array("hidden")


def _drop(arrays, field):
    return {k: v for k, v in arrays.items() if k != field}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a | {"token": a["token"][:-1]}, "token"),
        (lambda a: _drop(a, "gates"), "gates"),
        (lambda a: a | {"extra": a["token"]}, "extra"),
        (lambda a: a | {"gates": a["gates"][:, :, :1]}, "gates"),
        (lambda a: a | {"logits": a["logits"][:, :1]}, "logits"),
        (lambda a: a | {"experts": a["experts"] + 40000}, "experts"),
        (lambda a: a | {"experts": a["experts"].astype(np.float32)}, "experts"),
        (lambda a: a | {"pos": a["pos"][:, None]}, "pos"),
        (lambda a: a | {"logits": a["logits"] * 1e6}, "logits"),
    ],
)
def test_write_shard_rejects_bad_arrays(tmp_path, change, match):
    writer = SplitWriter(tmp_path, "train")
    with pytest.raises(ValueError, match=match):
        writer.write_shard(0, change(make_shard(4, 0)))
    assert not writer.is_complete(0)


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_every_required_field_is_required_and_the_optional_ones_are_not(tmp_path, field):
    writer = SplitWriter(tmp_path, "train")
    with pytest.raises(ValueError, match=rf"missing required trace field\(s\) \['{field}'\]"):
        writer.write_shard(0, {k: v for k, v in make_shard(3, 0).items() if k != field})
    info = writer.write_shard(1, make_shard(3, 1))  # neither hidden nor dropped
    assert sorted(info.sha256) == sorted(f"{name}.npy" for name in REQUIRED_FIELDS)
    assert set(TRACE_FIELDS) - set(REQUIRED_FIELDS) == {"hidden", "dropped", "lookahead_logits"}


def test_finalize_missing_shard(tmp_path):
    writer = SplitWriter(tmp_path, "train")
    writer.write_shard(0, make_shard(3, 0))
    writer.write_shard(2, make_shard(3, 2))
    with pytest.raises(ValueError, match="shard-00001"):
        writer.finalize(3)
    assert not (tmp_path / "train" / "tokens.parquet").exists()


def test_finalize_inconsistent_shards(tmp_path):
    writer = SplitWriter(tmp_path, "train")
    writer.write_shard(0, make_shard(3, 0, hidden=True))
    writer.write_shard(1, make_shard(3, 1, hidden=False))
    with pytest.raises(ValueError, match="shard-00001"):
        writer.finalize(2)


def test_write_manifest_requires_routing(tmp_path):
    manifest = synthetic_manifest()
    del manifest["routing"]
    with pytest.raises(ValueError, match="invalid: the top level: 'routing' is a required property"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / "manifest.json").exists()
