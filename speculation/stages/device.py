"""Where a stage runs: the torch device and CPU thread count from its config."""

from __future__ import annotations

import torch

from speculation.distributed import launch_ranks, rank_device
from speculation.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without it is an error, not a silent CPU run. Under
    torchrun a CUDA run without an index takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto.")
    return rank_device(torch.device(name), launch_ranks())
