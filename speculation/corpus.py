"""Documents for the source LM and the traces: loading, deterministic splitting, fingerprinting.

A document is the unit of splitting (a stdlib file, one of the user's files, one dataset row), so that no
text is shared between train, val and test. Splits come from a hash of the document id alone, which keeps them
stable when documents are added or removed.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from speculation.config.collect import CorpusConfig, CorpusKind
from speculation.errors import MissingInputError, UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# datasets' packaged builders for a single local file passed as corpus.dataset
_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
_LOCAL_PATH_HINT = (
    "Pass a local path as corpus.dataset instead: a directory of .jsonl/.parquet files, one such file, "
    "or a directory written by Dataset.save_to_disk."
)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


class DatasetUnavailableError(ValueError):
    """corpus.dataset could not be loaded from the Hub (offline, unreachable or unknown)."""


def load_documents(cfg: CorpusConfig) -> list[Document]:
    """All documents of the configured corpus, sorted by id, truncated, without empty ones."""
    if cfg.kind == CorpusKind.stdlib:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        source = f"the standard library at {stdlib}"
        fix = "check the Python installation or use corpus=text_files."
        docs = _finish(_stdlib_documents(stdlib), cfg)
    elif cfg.kind == CorpusKind.text_files:
        source = f"corpus.glob={cfg.glob!r}"
        fix = "check that the files are UTF-8 text and not all empty, or point corpus.glob at other files."
        docs = _finish(_text_file_documents(cfg.glob or ""), cfg)
    elif cfg.kind == CorpusKind.hf_dataset:
        source = f"corpus.dataset={cfg.dataset!r} (split {cfg.dataset_split!r}, field {cfg.text_field!r})"
        fix = "check corpus.text_field and corpus.dataset_split."
        docs = _finish(_dataset_documents(cfg), cfg)
    else:
        raise UserError(f"corpus.kind={cfg.kind!r} is not one of {[k.value for k in CorpusKind]}.")
    if not docs:
        raise UserError(f"No non-empty documents in {source}; {fix}")
    return docs


def _finish(docs: Iterable[Document], cfg: CorpusConfig) -> list[Document]:
    """Truncate, drop empty documents, keep the first max_documents. ``docs`` must arrive sorted by id."""

    def cleaned() -> Iterator[Document]:
        for doc in docs:
            text = doc.text if cfg.max_document_chars is None else doc.text[: cfg.max_document_chars]
            if text.strip():
                yield Document(doc.doc_id, text)

    # Lazy on purpose: with max_documents only the first few files are read at all.
    return list(islice(cleaned(), cfg.max_documents))


def _read(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _stdlib_documents(stdlib: Path) -> Iterator[Document]:
    ids = sorted(
        path.relative_to(stdlib).as_posix()
        for path in stdlib.rglob("*.py")
        if path.is_file() and not {"site-packages", "dist-packages"} & set(path.relative_to(stdlib).parts)
    )
    for doc_id in ids:
        yield Document(doc_id, _read(stdlib / doc_id))


def read_text_file(path: str | Path) -> str | None:
    """The file's text, or None if it is not UTF-8 text (a NUL byte, or bytes that do not decode)."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_file_documents(pattern: str) -> Iterator[Document]:
    """Every UTF-8 text file the pattern matches, sorted by path; the others are skipped with a warning."""
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise UserError(
            f"corpus.glob={pattern!r} matched no files (relative to {os.getcwd()}). Fix the pattern, e.g. "
            "corpus.glob='docs/**/*.md' ('**' matches subdirectories), or use an absolute path."
        )
    skipped = []
    for path in paths:
        text = read_text_file(path)
        if text is None:
            skipped.append(path)
            continue
        yield Document(path, text)
    if skipped:
        log.warning(
            "corpus.glob=%r: skipped %d of %d files that are not UTF-8 text (binary, or another encoding), e.g. %s",
            pattern, len(skipped), len(paths), ", ".join(skipped[:3]),
        )  # fmt: skip


def _dataset_documents(cfg: CorpusConfig) -> Iterator[Document]:
    dataset = _load_dataset(cfg)
    if cfg.text_field not in dataset.column_names:
        raise UserError(
            f"corpus.text_field={cfg.text_field!r} is not a column of {cfg.dataset!r}; its columns are "
            f"{dataset.column_names}. Set corpus.text_field to one of them."
        )
    index = 0
    for batch in dataset.select_columns([cfg.text_field]).iter(batch_size=1000):
        for text in batch[cfg.text_field]:
            if text is not None and not isinstance(text, str):
                raise UserError(
                    f"corpus.text_field={cfg.text_field!r} of {cfg.dataset!r} holds {type(text).__name__} "
                    "values, not text. Pick a string column."
                )
            # index order is doc_id order thanks to the zero padding
            yield Document(f"{cfg.dataset}:{cfg.dataset_split}:{index:08d}", text or "")
            index += 1


def _load_dataset(cfg: CorpusConfig) -> Any:
    """The ``datasets.Dataset`` of ``cfg``: a Hub name, a local data directory or file, or a saved dataset."""
    try:
        import datasets
    except ImportError:
        raise ImportError('corpus=hf_dataset needs the datasets library: pip install "moe-speculation[hf]"') from None
    name = os.path.expanduser(cfg.dataset or "")
    split = cfg.dataset_split
    local = Path(name)
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        # written by save_to_disk, which load_dataset refuses to read
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(
                    f"corpus.dataset_split={split!r} is not in the saved dataset {name!r}; its splits are "
                    f"{list(loaded)}. Set corpus.dataset_split to one of them."
                )
            loaded = loaded[split]
        return loaded
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise UserError(
                f"corpus.dataset={cfg.dataset!r} is a file of unknown type; use one of {sorted(_FILE_BUILDERS)}."
            )
        return datasets.load_dataset(builder, data_files=name, split=split)
    if name.startswith((".", "/", "~")) and not local.exists():
        raise MissingInputError(f"corpus.dataset={cfg.dataset!r} does not exist. Fix the path.")
    try:
        return datasets.load_dataset(name, cfg.dataset_config, split=split)
    except (ConnectionError, OSError, *_hub_connection_errors()) as error:
        # FileNotFoundError (an OSError) is also what datasets raises for an unknown name, so say both.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or "unset"
        raise DatasetUnavailableError(
            f"corpus.dataset={cfg.dataset!r} could not be loaded ({type(error).__name__}: {reason}); the "
            f"Hugging Face Hub is unreachable or offline mode is on (HF_HUB_OFFLINE={offline}) with nothing "
            f"cached, or the name is wrong. {_LOCAL_PATH_HINT}"
        ) from None


def _hub_connection_errors() -> tuple[type[BaseException], ...]:
    """httpx / requests transport errors, which are not all OSErrors; empty when neither is installed."""
    errors: list[type[BaseException]] = []
    try:
        import httpx

        errors += [httpx.TransportError]
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def assign_split(doc_id: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for one document, from a hash of its id only."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_documents(docs: Sequence[Document], cfg: CorpusConfig) -> dict[str, list[Document]]:
    """Documents per split (keys train, val, test; lists may be empty), in their original order."""
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in docs:
        splits[assign_split(doc.doc_id, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)].append(doc)
    return splits


def corpus_fingerprint(cfg: CorpusConfig, docs: Sequence[Document]) -> str:
    """sha256 hex identifying the documents and their split assignment (a cache key for tokenizer and model).

    Where the documents came from (kind, glob, dataset, truncation) is not hashed: the ids and texts already
    say everything it changed, so two configs that yield the same documents share caches.
    """
    digest = hashlib.sha256()
    settings = {
        "version": 1,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "split_salt": cfg.split_salt,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for doc in docs:
        text_hash = hashlib.sha256(doc.text.encode("utf-8", errors="surrogatepass")).hexdigest()
        # NUL separators: ids and hashes cannot contain them, so the encoding is unambiguous
        digest.update(f"\0{doc.doc_id}\0{text_hash}".encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()
