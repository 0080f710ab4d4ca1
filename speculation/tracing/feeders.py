"""Turn documents into traced sequences and feed batches of them to a model.

A *feeder* runs one forward pass on a batch of :class:`Chunk` s and says, for every token stream (stack) it fed,
which positions were real tokens and what each real token is (token id, document, position, sequence). The
recorder of each stack then keeps exactly those rows, in the same (sequence, position) order.

- :class:`CausalFeeder`: decoder-only models (the embedded LM and HF causal LMs); a chunk is one context.
- :class:`Seq2SeqFeeder`: encoder-decoder models (Switch). The encoder reads the first part of each chunk, the
  decoder is teacher-forced on the continuation, so decoder rows are decode-time routing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Metadata = dict[str, np.ndarray]  # token, doc, pos, seq: int32 [N] each


@dataclass(frozen=True)
class Chunk:
    """One traced sequence: ``ids`` are tokens ``start .. start + len(ids)`` of document ``doc``."""

    seq: int
    doc: int
    start: int
    ids: np.ndarray


def sample_order(doc_ids: Sequence[str], salt: str) -> list[int]:
    """A hash-random but fixed order of documents, so a token budget takes an unbiased sample of them."""
    return sorted(range(len(doc_ids)), key=lambda i: hashlib.sha256(f"{salt}:order:{doc_ids[i]}".encode()).digest())


def make_chunks(
    documents: Sequence[np.ndarray], seq_len: int, max_tokens: int | None = None, min_tokens: int = 1
) -> list[Chunk]:
    """Cut each document (in the given order) into pieces of at most ``seq_len`` tokens.

    Pieces shorter than ``min_tokens`` are skipped; with ``max_tokens``, stops after the chunk that reaches it.
    """
    chunks: list[Chunk] = []
    total = 0
    for doc, ids in enumerate(documents):
        for start in range(0, len(ids), seq_len):
            piece = np.asarray(ids[start : start + seq_len], dtype=np.int64)
            if len(piece) < min_tokens:
                continue
            chunks.append(Chunk(seq=len(chunks), doc=doc, start=start, ids=piece))
            total += len(piece)
            if max_tokens is not None and total >= max_tokens:
                return chunks
    return chunks


def pad_right(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the bool mask of real tokens. Right padding keeps causal routing exact."""
    width = max(len(ids) for ids in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = True
    return tokens, mask


def metadata(chunks: Sequence[Chunk], ids: Sequence[np.ndarray], starts: Sequence[int]) -> Metadata:
    """Per-row metadata for the rows ``ids`` fed for each chunk, the first at document position ``start``."""
    return {
        "token": np.concatenate(ids).astype(np.int32),
        "doc": np.concatenate([np.full(len(i), c.doc) for c, i in zip(chunks, ids, strict=True)]).astype(np.int32),
        "pos": np.concatenate([np.arange(s, s + len(i)) for s, i in zip(starts, ids, strict=True)]).astype(np.int32),
        "seq": np.concatenate([np.full(len(i), c.seq) for c, i in zip(chunks, ids, strict=True)]).astype(np.int32),
    }


class CausalFeeder:
    """Decoder-only models: each chunk is one right-padded context."""

    stacks = ("decoder",)
    min_tokens = 1

    def __init__(self, pad_id: int, hf_style: bool) -> None:
        self.pad_id = pad_id
        self.hf_style = hf_style  # HF models take keyword input_ids/attention_mask; ours takes (tokens, mask)

    def __call__(self, model: nn.Module, chunks: Sequence[Chunk], device: torch.device) -> dict:
        ids = [chunk.ids for chunk in chunks]
        tokens, mask = pad_right(ids, self.pad_id)
        if self.hf_style:
            model(input_ids=tokens.to(device), attention_mask=mask.long().to(device), use_cache=False)
        else:
            model(tokens.to(device), mask.to(device))
        return {"decoder": (mask, metadata(chunks, ids, [c.start for c in chunks]))}


class Seq2SeqFeeder:
    """Encoder-decoder models: the encoder reads a chunk's first part, the decoder the continuation.

    The decoder input is ``[decoder_start] + continuation[:-1]`` (teacher forcing), so its step ``t`` routes
    the token it would have generated at step ``t - 1``: exactly the routing during generation. The start token's
    row gets the position of the last encoder token (where generation starts).
    """

    stacks = ("decoder", "encoder")
    min_tokens = 2  # one token for each side

    def __init__(self, pad_id: int, decoder_start_id: int, encoder_fraction: float) -> None:
        self.pad_id = pad_id
        self.decoder_start_id = decoder_start_id
        self.encoder_fraction = encoder_fraction

    def encoder_length(self, chunk_length: int) -> int:
        return min(max(1, round(chunk_length * self.encoder_fraction)), chunk_length - 1)

    def __call__(self, model: nn.Module, chunks: Sequence[Chunk], device: torch.device) -> dict:
        split = [self.encoder_length(len(chunk.ids)) for chunk in chunks]
        encoder_ids = [chunk.ids[:n] for chunk, n in zip(chunks, split, strict=True)]
        decoder_ids = [
            np.concatenate([[self.decoder_start_id], chunk.ids[n:-1]]) for chunk, n in zip(chunks, split, strict=True)
        ]
        encoder_tokens, encoder_mask = pad_right(encoder_ids, self.pad_id)
        decoder_tokens, decoder_mask = pad_right(decoder_ids, self.pad_id)
        model(
            input_ids=encoder_tokens.to(device),
            attention_mask=encoder_mask.long().to(device),
            decoder_input_ids=decoder_tokens.to(device),
            decoder_attention_mask=decoder_mask.long().to(device),
            use_cache=False,
        )
        return {
            "encoder": (encoder_mask, metadata(chunks, encoder_ids, [c.start for c in chunks])),
            "decoder": (
                decoder_mask,
                metadata(chunks, decoder_ids, [c.start + n - 1 for c, n in zip(chunks, split, strict=True)]),
            ),
        }
