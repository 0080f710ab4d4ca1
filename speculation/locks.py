"""Locks on the parts of a workdir, so that two processes never write the same files.

======================  ======================================  =========================================
lock (``Workdir.lock``)  held exclusively by                     held shared by
======================  ======================================  =========================================
``traces``              ``spec-collect`` (source model, traces)  ``spec-train``, ``spec-evaluate`` (readers)
``run-<name>``          ``spec-train`` of that run               -
``eval-<stack>``        ``spec-evaluate`` of that stack          -
======================  ======================================  =========================================

So a second collection of one workdir refuses at once, while runs of different names train side by side (a
parallel sweep) and evaluations read the traces together. A refused process gets one line naming the holder's pid.

These are ``flock`` locks: the kernel drops them when their process dies, so a killed run never leaves a stale
lock behind and its rerun resumes at once. (``filelock`` takes the same exclusive lock, but neither says who holds
it nor offers a shared mode, which the readers need.) The exclusive holder writes its pid and command into the
lock file, for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from speculation.errors import UserError


def _holder(path: Path) -> str:
    """Who holds ``path``: the exclusive holder's pid and command, else the readers."""
    try:
        record = json.loads(path.read_text())
        os.kill(int(record["pid"]), 0)  # raises if that process is gone (a reader holds the lock then)
        return f"pid {record['pid']} ({record['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process reading it (spec-train or spec-evaluate)"


@contextlib.contextmanager
def locked(path: Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold ``path`` (created if needed) exclusively, or ``shared`` with other readers, for the block.

    ``what`` names the locked thing in the refusal: "cannot lock <what>: it is in use by pid N (...); wait ...".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"cannot lock {what}: it is in use by {_holder(path)}; wait for it to finish (or stop it), then run "
                "this again."
            ) from None
        if not shared:
            os.ftruncate(fd, 0)
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
        try:
            yield
        finally:
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
