"""Would-be misses of training windows (``speculation.predictors.windows``), against the evaluation's definition."""

from __future__ import annotations

import numpy as np
import torch

from speculation.predictors.windows import shift_layers, window_misses
from speculation.traces.batches import previous_rows, would_be_misses


def test_window_misses_follow_the_evaluation_definition_and_ignore_padding():
    # 2 windows of 4 positions, 2 layers, K = 1; window 1 has one padded position.
    experts_BTLK = np.array(
        [[[[0], [1]], [[0], [2]], [[1], [2]], [[0], [1]]],
         [[[3], [0]], [[3], [0]], [[2], [0]], [[7], [7]]]]
    )  # fmt: skip
    mask_BT = np.array([[True, True, True, True], [True, True, True, False]])
    misses = window_misses(experts_BTLK, mask_BT, window=1)
    # layer 0, window 0: 0 (first), 0 (seen), 1 (new), 0 (previous was 1): miss, hit, miss, miss
    np.testing.assert_array_equal(misses[0, :, 0], [1, 0, 1, 1])
    np.testing.assert_array_equal(misses[1, :, 1], [1, 0, 0, 0])  # the padded position is never a miss
    real = mask_BT.reshape(-1)
    seq_N = np.repeat([0, 1], 4)[real]
    flat = experts_BTLK.reshape(8, 2, 1)[real]
    for layer in range(2):  # the same as scoring the real tokens as one trace
        expected = would_be_misses(flat[:, layer], previous_rows(seq_N), 1)
        np.testing.assert_array_equal(misses.reshape(8, 2)[real][:, layer], expected)
    shifted = shift_layers(torch.from_numpy(misses), 1, 0)
    np.testing.assert_array_equal(shifted[0, :, 0, 0].numpy(), misses[0, :, 1])  # target layer l + 1
