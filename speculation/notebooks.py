"""What the analysis notebooks share: finding the workdir they read, and showing the library's figures inline."""

from __future__ import annotations

import os
from pathlib import Path

from speculation.config import CONF_DIR
from speculation.workdir import Workdir

REPO_ROOT = Path(CONF_DIR).parent


def workdir_from_env(default: str = "outputs/smoke") -> Workdir:
    """``$SPEC_WORKDIR`` (or ``default``); a relative path missing from the cwd is taken from the repository root,
    so a notebook finds ``outputs/smoke`` whether it runs from ``notebooks/`` (Jupyter, nbmake) or the root."""
    root = Path(os.environ.get("SPEC_WORKDIR", default)).expanduser()
    if not root.is_absolute() and not root.exists():
        root = REPO_ROOT / root
    return Workdir(root)


def show_figures_inline() -> None:
    """Render ``matplotlib.figure.Figure`` objects (what ``speculation.plots`` returns) as PNG in a notebook.

    pyplot's inline backend registers that formatter only once pyplot is imported; the library's figures never
    touch pyplot, so a notebook calls this first (a no-op outside IPython).
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
