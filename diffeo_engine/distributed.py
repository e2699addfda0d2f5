"""torchrun / torch.distributed helpers: one process group, disjoint shares of ids.

Launch any command under ``torchrun`` (or set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` yourself): :func:`distributed_session` initialises the process group (NCCL
for CUDA, Gloo otherwise), gives each rank a contiguous, balanced share of the ids, and
tears the group down at the end. Because a perturbation depends only on ``(seed, id)``,
results do not depend on the number of processes. A rank that dies makes the others fail
with :class:`DistributedError` after ``timeout_s`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "DistributedError",
    "distributed_session",
    "in_torchrun",
    "shard_range",
]

DEFAULT_TIMEOUT_S = 300.0
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or timed out: typically another rank died."""


def in_torchrun() -> bool:
    """Whether the launch variables of ``torchrun`` are set with more than one process."""
    if not all(name in os.environ for name in _LAUNCH_VARIABLES):
        return False
    return int(os.environ["WORLD_SIZE"]) > 1


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``range(n)`` of ``rank``: sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if n < 0:
        raise ValueError(f"n: expected a count >= 0, got {n}")
    return range(n * rank // world_size, n * (rank + 1) // world_size)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (``1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """This rank's share of ``range(n)``."""
        return shard_range(n, self.rank, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place on a copy); identity on one process."""
        if not self.active:
            return tensor
        device = "cuda" if self.backend == "nccl" else "cpu"
        buffer = tensor.detach().to(device).clone()
        try:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistBackendError) as error:
            raise DistributedError(
                f"rank {self.rank}: all-reduce across {self.world_size} processes failed "
                f"(did another rank die?): {error}"
            ) from error
        return buffer.to(tensor.device)

    def barrier(self) -> None:
        if not self.active:
            return
        try:
            dist.barrier()
        except (RuntimeError, dist.DistBackendError) as error:
            raise DistributedError(
                f"rank {self.rank}: barrier across {self.world_size} processes failed "
                f"(did another rank die?): {error}"
            ) from error


@contextlib.contextmanager
def distributed_session(
    device: str | torch.device | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[DistributedContext]:
    """Initialise the process group when launched by torchrun; yield the context.

    Without the launch variables (or with ``WORLD_SIZE=1``) this yields a one-process
    context and touches nothing. On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    if not in_torchrun():
        yield DistributedContext()
        return
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.device(device).type == "cuda" if device is not None else False
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    try:
        yield DistributedContext(rank, world_size, local_rank, backend)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
