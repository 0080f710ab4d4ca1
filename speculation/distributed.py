"""Several processes under ``torchrun``: which rank this process is, and the process group the ranks share.

``torchrun --nproc-per-node N <console script or -m module> ...`` starts N copies of a stage with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment; a plain run has none of them and is
rank 0 of 1. :func:`process_group` joins the group torchrun set up (gloo for CPU work, NCCL for CUDA) and leaves
it at the end; everything else here works the same with or without a group, so stages call it unconditionally.

The ranks of one machine share its cores, so each takes ``cores // LOCAL_WORLD_SIZE`` threads
(:func:`speculation.stages.job.threads_per_job`), and each takes GPU ``LOCAL_RANK`` when the run is on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from speculation.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the console scripts read the ranks (their thread count)
# before Hydra parses the command line, and --help must not pay for importing torch.

_TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits this long at a barrier fails instead of hanging


@dataclass(frozen=True)
class Ranks:
    """This process' place among the ranks of a launch (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes what all ranks share (manifests, checkpoints, curves, W&B)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether this rank does item ``index`` of a list dealt round-robin (shard ``i`` to rank ``i % world``)."""
        return index % self.world == self.rank


SINGLE_PROCESS = Ranks()  # a plain run: rank 0 of 1


def launch_ranks() -> Ranks:
    """The ranks torchrun announced in the environment; rank 0 of 1 without torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = Ranks(
            rank=int(os.environ.get("RANK", "0")),
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )
    except ValueError as err:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers ({err}); launch with torchrun.") from None
    if not 0 <= ranks.rank < ranks.world or not 0 <= ranks.local_rank < ranks.local_world:
        raise UserError(f"rank {ranks.rank} of {ranks.world} (local {ranks.local_rank} of {ranks.local_world}) is "
                        "not a valid place; launch with torchrun.")  # fmt: skip
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A CUDA run without a device index takes GPU ``LOCAL_RANK``: one GPU per rank."""
    import torch

    if device.type == "cuda" and device.index is None and ranks.world > 1:
        return torch.device("cuda", ranks.local_rank)
    return device


def active() -> bool:
    """A process group is set up: collectives and barriers reach the other ranks."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group for the body (NCCL on CUDA, gloo on CPU); a plain run joins none.

    A group that is already set up (a caller's own) is used and left alone.
    """
    import torch
    import torch.distributed as dist

    ranks = launch_ranks()
    if ranks.world == 1 or active():
        yield ranks
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=_TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks: rank 0 makes what they then find and load (a
    tokenizer, a trained model) instead of every rank making it at once."""
    if not ranks.is_main:
        barrier()
    yield
    if ranks.is_main:
        barrier()


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a group)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: object, source: int = 0) -> object:
    """``value`` as rank ``source`` has it, on every rank (itself without a group)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]
