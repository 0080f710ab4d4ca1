"""Every file a stage writes goes through here: a killed run never leaves a half-written file under its final name.

A file is written to a temporary sibling ``<name>.tmp``, flushed to disk (fsync), renamed onto its name, and the
rename itself made durable (fsync of the directory). The ``.tmp`` suffix means a leftover never passes for a CSV,
a figure or a Hydra config; :func:`remove_stale_temps` deletes the ones a killed writer left behind. Writers that
infer the format from the suffix (matplotlib, pandas) must be told it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temporary(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened or synced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write, flushed and renamed onto ``path`` only if the block finishes
    (removed if it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """A fresh temporary directory to fill, renamed onto ``path`` (replacing it) once every file in it is on disk."""
    path = Path(path)
    tmp = temporary(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                fsync_file(child)
        fsync_dir(tmp)
        if path.exists():  # an explicit rewrite replaces the old directory
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, payload: Any, **dumps: Any) -> None:
    """``json.dumps(payload, **dumps)`` (``indent=2`` unless given), atomically."""
    atomic_write_text(path, json.dumps(payload, **{"indent": 2, **dumps}))


def remove_stale_temps(directory: Path | str) -> list[Path]:
    """Delete the ``*.tmp`` files and directories a killed writer left in ``directory``; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(f"*{TMP_SUFFIX}")) if directory.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
