"""Chunking, padding and the feeders' per-stack row metadata, checked by hand."""

from __future__ import annotations

import numpy as np
import torch

from speculation.tracing.feeders import CausalFeeder, Chunk, Seq2SeqFeeder, make_chunks, metadata, pad_right


class RecordingModel(torch.nn.Module):
    """Stands in for a model: remembers what it was called with."""

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_make_chunks_cuts_documents_and_respects_the_budget():
    docs = [np.arange(10, 15), np.arange(20, 23)]
    chunks = make_chunks(docs, seq_len=2)
    assert [(c.seq, c.doc, c.start, c.ids.tolist()) for c in chunks] == [
        (0, 0, 0, [10, 11]), (1, 0, 2, [12, 13]), (2, 0, 4, [14]), (3, 1, 0, [20, 21]), (4, 1, 2, [22]),
    ]  # fmt: skip
    assert len(make_chunks(docs, seq_len=2, max_tokens=4)) == 2  # stops at the chunk that reaches the budget
    assert [c.ids.tolist() for c in make_chunks(docs, seq_len=2, min_tokens=2)] == [[10, 11], [12, 13], [20, 21]]


def test_pad_right_and_metadata():
    tokens, mask = pad_right([np.array([5, 6, 7]), np.array([8])], pad_id=1)
    assert tokens.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    chunks = [Chunk(seq=4, doc=2, start=6, ids=np.array([5, 6, 7])), Chunk(seq=5, doc=3, start=0, ids=np.array([8]))]
    rows = metadata(chunks, [c.ids for c in chunks], [6, 0])
    assert rows["token"].tolist() == [5, 6, 7, 8]
    assert rows["doc"].tolist() == [2, 2, 2, 3]
    assert rows["pos"].tolist() == [6, 7, 8, 0]
    assert rows["seq"].tolist() == [4, 4, 4, 5]


def test_causal_feeder_calls_embedded_and_hf_models_their_way():
    chunks = [Chunk(seq=0, doc=0, start=0, ids=np.array([3, 4]))]
    model = RecordingModel()
    fed = CausalFeeder(pad_id=1, hf_style=False)(model, chunks, torch.device("cpu"))
    assert model.args[0].tolist() == [[3, 4]] and model.args[1].tolist() == [[True, True]]
    assert list(fed) == ["decoder"]
    CausalFeeder(pad_id=1, hf_style=True)(model, chunks, torch.device("cpu"))
    assert model.kwargs["attention_mask"].dtype == torch.long and model.kwargs["input_ids"].tolist() == [[3, 4]]


def test_seq2seq_feeder_teacher_forces_the_continuation():
    feeder = Seq2SeqFeeder(pad_id=0, decoder_start_id=0, encoder_fraction=0.5)
    chunks = [
        Chunk(seq=0, doc=7, start=10, ids=np.array([11, 12, 13, 14, 15, 16])),
        Chunk(seq=1, doc=8, start=0, ids=np.array([21, 22, 23])),
    ]
    model = RecordingModel()
    fed = feeder(model, chunks, torch.device("cpu"))
    # Encoder: first half (3 and round(1.5)=2 tokens); decoder: [start] + continuation[:-1].
    assert model.kwargs["input_ids"].tolist() == [[11, 12, 13], [21, 22, 0]]
    assert model.kwargs["decoder_input_ids"].tolist() == [[0, 14, 15], [0, 0, 0]]
    assert model.kwargs["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    encoder_mask, encoder_rows = fed["encoder"]
    decoder_mask, decoder_rows = fed["decoder"]
    assert encoder_rows["pos"].tolist() == [10, 11, 12, 0, 1]
    assert decoder_rows["token"].tolist() == [0, 14, 15, 0]
    assert decoder_rows["pos"].tolist() == [12, 13, 14, 1]  # the start token sits where the prompt ends
    assert decoder_rows["seq"].tolist() == [0, 0, 0, 1]
    assert int(decoder_mask.sum()) == len(decoder_rows["token"]) and int(encoder_mask.sum()) == 5


def test_seq2seq_split_leaves_both_sides_a_token():
    feeder = Seq2SeqFeeder(pad_id=0, decoder_start_id=0, encoder_fraction=0.9)
    assert feeder.encoder_length(2) == 1 and feeder.encoder_length(10) == 9
    assert Seq2SeqFeeder(pad_id=0, decoder_start_id=0, encoder_fraction=0.01).encoder_length(10) == 1
