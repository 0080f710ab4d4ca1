"""Byte-level BPE training, caching, encoding and the unigram baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from speculation.corpus import Document
from speculation.tokenizer import (
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    encode_documents,
    load_or_train_tokenizer,
    train_tokenizer,
    unigram_cross_entropy,
)

SNIPPET = '''def greet(name: str) -> str:
    """Say hello, in ünïcödé too. 🐍"""
    if not name:\t# tabs, too
        return "hello, world"
    return f"hello, {name}!"\r\n
'''
DOCS = [Document(f"doc{i}.py", SNIPPET.replace("greet", f"greet_{i}") * 3) for i in range(20)]
VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, VOCAB, min_frequency=2)


def test_special_token_ids(tokenizer):
    assert (EOS_ID, PAD_ID) == (0, 1)
    assert tokenizer.token_to_id(EOS) == EOS_ID and tokenizer.token_to_id(PAD) == PAD_ID
    assert tokenizer.encode(EOS + "x" + PAD, add_special_tokens=False).ids[0] == EOS_ID
    assert tokenizer.get_vocab_size() <= VOCAB


def test_round_trip_and_merges(tokenizer):
    [ids] = encode_documents(tokenizer, [Document("s", SNIPPET)])
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tokenizer.decode(ids.tolist()) == SNIPPET
    assert len(ids) < len(SNIPPET.encode())  # merges actually compress
    unseen = "zq@~ unseen bytes \x00\x7f"  # byte-level: nothing is unknown
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen


def test_encode_documents_adds_no_eos(tokenizer):
    ids = encode_documents(tokenizer, [*DOCS[:3], Document("e", "x")])
    assert len(ids) == 4
    assert all(EOS_ID not in a and PAD_ID not in a for a in ids)


def test_training_is_deterministic(tokenizer):
    assert train_tokenizer(DOCS, VOCAB, min_frequency=2).to_str() == tokenizer.to_str()


@pytest.mark.parametrize("vocab_size", [0, 256, 258])
def test_too_small_vocab(tmp_path, vocab_size):
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size}\b.*>= 259"):
        train_tokenizer(DOCS, vocab_size)
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        load_or_train_tokenizer(tmp_path / "tokenizer.json", DOCS, vocab_size, 2, "fp")


def test_cache_reused_then_retrained(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    meta_path = tmp_path / "tok" / "tokenizer.meta.json"
    first = load_or_train_tokenizer(path, DOCS, VOCAB, 2, "fingerprint-a")
    assert json.loads(meta_path.read_text()) == {
        "fingerprint": "fingerprint-a",
        "vocab_size": VOCAB,
        "min_frequency": 2,
    }
    mtime = path.stat().st_mtime_ns

    # same settings: loaded, not retrained (it would be trained on no documents if it were)
    again = load_or_train_tokenizer(path, [], VOCAB, 2, "fingerprint-a")
    assert path.stat().st_mtime_ns == mtime
    assert again.to_str() == first.to_str()

    # another fingerprint: retrained on the new documents and rewritten
    other_docs = [Document("o", "completely different words " * 50)]
    retrained = load_or_train_tokenizer(path, other_docs, VOCAB, 2, "fingerprint-b")
    assert retrained.to_str() != first.to_str()
    assert json.loads(meta_path.read_text())["fingerprint"] == "fingerprint-b"
    assert retrained.to_str() == path.read_text(encoding="utf-8")
    assert not list(path.parent.glob(".*tmp*"))  # no temporary files left behind

    # a changed min_frequency also misses the cache
    load_or_train_tokenizer(path, other_docs, VOCAB, 3, "fingerprint-b")
    assert json.loads(meta_path.read_text())["min_frequency"] == 3


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = tmp_path / "tokenizer.json"
    load_or_train_tokenizer(path, DOCS, VOCAB, 2, "fp")
    path.write_text("{not json")
    rebuilt = load_or_train_tokenizer(path, DOCS, VOCAB, 2, "fp")
    assert rebuilt.token_to_id(EOS) == EOS_ID
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_unigram_cross_entropy_hand_computed():
    # vocab 4, train counts [3, 1, 0, 0] over N=4 tokens -> p = (c + 1) / (4 + 4) = [4/8, 2/8, 1/8, 1/8]
    train = [np.array([0, 0, 1], dtype=np.int32), np.array([0], dtype=np.int32)]
    evals = [np.array([0, 2], dtype=np.int32), np.array([1], dtype=np.int32)]
    expected = -(math.log(4 / 8) + math.log(1 / 8) + math.log(2 / 8)) / 3
    assert unigram_cross_entropy(train, evals, vocab_size=4) == pytest.approx(expected, rel=1e-12)
    # no training data: the uniform distribution, log V nats
    assert unigram_cross_entropy([], evals, vocab_size=4) == pytest.approx(math.log(4))


def test_unigram_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="no eval tokens"):
        unigram_cross_entropy([np.array([0])], [np.array([], dtype=np.int32)], vocab_size=4)
    with pytest.raises(ValueError, match="vocab_size=4"):
        unigram_cross_entropy([np.array([0])], [np.array([4])], vocab_size=4)
