"""What the analysis notebooks share: finding the workdir they read."""

from __future__ import annotations

import os
from pathlib import Path

from speculation.config import CONF_DIR

REPO_ROOT = Path(CONF_DIR).parent


def workdir_from_env(default: str = "outputs/smoke") -> Path:
    """``$SPEC_WORKDIR`` (or ``default``); a relative path missing from the cwd is taken from the repository root,
    so a notebook finds ``outputs/smoke`` whether it runs from ``notebooks/`` (Jupyter, nbmake) or the root."""
    workdir = Path(os.environ.get("SPEC_WORKDIR", default)).expanduser()
    if not workdir.is_absolute() and not workdir.exists():
        workdir = REPO_ROOT / workdir
    return workdir
