from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import synthetic_manifest
from torch.utils.data import DataLoader

from speculation.traces import (
    SequenceDataset,
    SplitWriter,
    TraceSplit,
    TraceStore,
    routing_frame,
    write_manifest,
)

ROUTING = {"num_experts": 4, "max_experts_per_token": 2, "layers": ["l0", "l1"]}


def open_split(root: Path, shards: list[dict[str, np.ndarray]]) -> TraceSplit:
    writer = SplitWriter(root, "train")
    for i, arrays in enumerate(shards):
        writer.write_shard(i, arrays)
    write_manifest(root, synthetic_manifest(ROUTING, splits={"train": writer.finalize(len(shards))}))
    return TraceStore.open(root).split("train")


def rows_with_seq(seq: list[int], first_row: int = 0) -> dict[str, np.ndarray]:
    n = len(seq)
    row = first_row + np.arange(n)
    return {
        "experts": (row[:, None, None] + np.arange(4).reshape(1, 2, 2)) % 4,  # [n, 2, 2]
        "gates": np.full((n, 2, 2), 0.5),
        "logits": row[:, None, None] + np.zeros((n, 2, 4)),
        "token": 100 + row,
        "doc": np.zeros(n, dtype=np.int32),
        "pos": row,
        "seq": np.array(seq),
    }


def test_routing_frame_hand_checked(tmp_path):
    split = open_split(
        tmp_path,
        [
            {
                "experts": np.array([[[0, 3], [1, -1]], [[2, 0], [3, 1]]]),
                "gates": np.array([[[0.75, 0.25], [1.0, 0.0]], [[0.5, 0.5], [0.625, 0.375]]]),
                "logits": np.zeros((2, 2, 4)),
                "token": np.array([7, 9]),
                "doc": np.array([4, 4]),
                "pos": np.array([10, 11]),
                "seq": np.array([2, 2]),
            }
        ],
    )
    expected = pd.DataFrame(
        {
            "row": np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.int64),
            "doc": np.full(8, 4, dtype=np.int32),
            "pos": np.array([10] * 4 + [11] * 4, dtype=np.int32),
            "seq": np.full(8, 2, dtype=np.int32),
            "token": np.array([7] * 4 + [9] * 4, dtype=np.int32),
            "layer": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int16),
            "rank": np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int16),
            "expert": np.array([0, 3, 1, -1, 2, 0, 3, 1], dtype=np.int16),
            "gate": np.array([0.75, 0.25, 1.0, 0.0, 0.5, 0.5, 0.625, 0.375], dtype=np.float32),
        }
    )
    pd.testing.assert_frame_equal(routing_frame(split), expected)
    pd.testing.assert_frame_equal(routing_frame(split, slice(1, 2)), expected.iloc[4:].reset_index(drop=True))
    reordered = pd.concat([expected.iloc[4:], expected.iloc[:4]], ignore_index=True)
    pd.testing.assert_frame_equal(routing_frame(split, np.array([1, 0])), reordered)
    pd.testing.assert_frame_equal(routing_frame(split, np.array([False, True])), routing_frame(split, slice(1, 2)))


def test_sequence_dataset_windows(tmp_path):
    # seq 0 has 5 rows, seq 1 has 2, seq 2 has 1; seq 1 straddles the shard boundary.
    split = open_split(tmp_path, [rows_with_seq([0, 0, 0, 0, 0, 1]), rows_with_seq([1, 2], first_row=6)])
    data = SequenceDataset(split, fields=("experts", "gates", "token"), window=2)
    assert len(data) == 5  # seq 0 -> 3 windows, seq 1 -> 1, seq 2 -> 1
    assert [data[i]["rows"].tolist() for i in range(5)] == [[0, 1], [2, 3], [4, -1], [5, 6], [7, -1]]

    last_of_seq0 = data[2]
    assert set(last_of_seq0) == {"experts", "gates", "token", "mask", "rows"}
    assert last_of_seq0["mask"].tolist() == [True, False]
    assert last_of_seq0["experts"].dtype == torch.long and last_of_seq0["gates"].dtype == torch.float32
    assert last_of_seq0["experts"].tolist() == [[[0, 1], [2, 3]], [[-1, -1], [-1, -1]]]  # row 4: (4 + j) % 4
    assert last_of_seq0["gates"].tolist() == [[[0.5, 0.5], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]
    assert last_of_seq0["token"].tolist() == [104, 0]
    assert data[3]["token"].tolist() == [105, 106]  # gathered across shards
    assert data[-1]["rows"].tolist() == [7, -1]
    with pytest.raises(IndexError):
        data[5]

    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch["experts"].shape == (2, 2, 2, 2)
    assert batch["mask"].tolist() == [[True, True], [True, True]]


def test_sequence_dataset_whole_sequences(tmp_path):
    split = open_split(tmp_path, [rows_with_seq([0, 0, 0, 0, 0, 1, 1, 2])])
    data = SequenceDataset(split)
    assert len(data) == 3 and data.window == 5
    item = data[2]
    assert item["mask"].tolist() == [True, False, False, False, False]
    assert item["rows"].tolist() == [7, -1, -1, -1, -1]
    assert item["logits"].shape == (5, 2, 4) and item["logits"].dtype == torch.float32
    assert item["logits"][0].eq(7.0).all() and item["logits"][1:].eq(0).all()


def test_sequence_dataset_rejects_bad_arguments(tmp_path):
    split = open_split(tmp_path, [rows_with_seq([0, 0])])
    with pytest.raises(ValueError, match="hidden"):
        SequenceDataset(split, fields=("experts", "hidden"))
    with pytest.raises(ValueError, match="window"):
        SequenceDataset(split, window=0)
