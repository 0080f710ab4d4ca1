"""Several processes under ``torchrun``: which rank this process is, and the process group the ranks share.

``torchrun --nproc-per-node N <console script or -m module> ...`` starts N copies of a stage with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment; a plain run has none of them and is
rank 0 of 1. :func:`process_group` joins the group torchrun set up (gloo for CPU work, NCCL for CUDA) and leaves
it at the end; everything else here works the same with or without a group, so stages call it unconditionally.

The ranks of one machine share its cores, so each takes ``cores // LOCAL_WORLD_SIZE`` threads
(:func:`speculation.stages.job.threads_per_job`), and each takes GPU ``LOCAL_RANK`` when the run is on CUDA.

Data-parallel training (``speculation.predictors.training``) reads more from here: :func:`share` (which rows of a
global batch a rank takes), :func:`total` (a batch statistic summed over every rank's rows, with its gradient),
:func:`broadcast_parameters` and :func:`average_gradients` (the two things DDP would do), and :func:`main_decides`,
so that what rank 0 alone decides (a lock, a run to reuse) reaches every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from speculation.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the console scripts read the ranks (their thread count)
# before Hydra parses the command line, and --help must not pay for importing torch.

_TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits this long at a barrier fails instead of hanging
T = TypeVar("T")


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


def main_decides(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its result on every rank (a plain run just calls it).

    A UserError on rank 0 (a lock held elsewhere, a run of another config) is raised on every rank with rank 0's
    message, so no rank waits at a later collective for a rank 0 that has given up.
    """
    if not active():
        return decide()
    import torch.distributed as dist

    if dist.get_rank() != 0:
        failed, value = broadcast_object(None)
        if failed:
            raise UserError(f"{value} (reported by rank 0)")
        return value  # type: ignore[return-value]
    try:
        value = decide()
    except UserError as err:
        broadcast_object((True, str(err)))
        raise
    except BaseException:
        broadcast_object((True, "rank 0 failed; its output says why"))
        raise
    broadcast_object((False, value))
    return value


def share(count: int, ranks: Ranks) -> slice:
    """The contiguous rows of a global batch of ``count`` that ``ranks.rank`` takes: ``count`` split into
    ``ranks.world`` parts whose sizes differ by at most one, the larger ones first (``numpy.array_split``'s)."""
    size, extra = divmod(count, ranks.world)
    start = ranks.rank * size + min(ranks.rank, extra)
    return slice(start, start + size + (ranks.rank < extra))


@functools.cache
def _sum_across_ranks() -> type:
    """The autograd function behind :func:`total` (built on first use: importing this module must not import
    torch)."""
    import torch
    import torch.distributed as dist

    class SumAcrossRanks(torch.autograd.Function):
        """y = sum over ranks of x, on every rank; each rank's y feeds its own loss, so dL/dx on a rank is the sum
        over ranks of dL_r/dy: the backward is the same all-reduce."""

        @staticmethod
        def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            summed = tensor.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(summed)
            return summed

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return SumAcrossRanks.apply(grad)

    return SumAcrossRanks


def total(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank (every rank gets the same sum); itself without a group.

    With a gradient: the backward sums every rank's gradient of the sum too, so when every rank minimises the same
    global loss built from these sums, rank r's parameter gradient is ``world ×`` its rows' share of the global
    gradient, and the mean over ranks (:func:`average_gradients`) is exactly the global batch's gradient.
    """
    if not active():
        return tensor
    if tensor.requires_grad:
        return _sum_across_ranks().apply(tensor)
    import torch.distributed as dist

    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every rank's parameters and buffers set to rank 0's (ranks that built a model from one seed agree anyway;
    this makes it so whatever the init does)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Every parameter's gradient replaced by its mean over ranks, in one all-reduce of all of them (what DDP does
    in buckets); a parameter without a gradient (a head whose loss term weighs 0) keeps none, on every rank alike.

    Not DDP itself: its reducer takes every parameter that reaches the forward's outputs as used and fails at the
    second step when such a head got no gradient, and with ``static_graph`` it skipped the first step's all-reduce
    (a dataclass output hides the tensors it hooks). One all-reduce after backward is exact whatever the loss uses;
    the overlap with backward it gives up is small for models of a predictor's size.
    """
    if not active():
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
