"""torchrun / torch.distributed helpers: one process group, disjoint shares of ids.

Launch any command under ``torchrun`` (or set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` yourself): :func:`distributed_session` initialises the process group (NCCL
for CUDA, Gloo otherwise), gives each rank a contiguous, balanced share of the ids, and
tears the group down at the end. Because a perturbation depends only on ``(seed, id)``,
results do not depend on the number of processes. A rank that dies makes the others fail
with :class:`DistributedError` (at the latest after ``timeout_s``, default 300 s or the
``DIFFEO_ENGINE_DIST_TIMEOUT`` environment variable) instead of hanging.

Small Python objects (manifests, layer lists) travel through ``all_gather_object`` and
``broadcast_object`` over Gloo, also when the tensors go through NCCL, so they work from
any thread and need no CUDA device.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TIMEOUT_ENV",
    "DistributedContext",
    "DistributedError",
    "distributed_session",
    "in_torchrun",
    "resolve_timeout",
    "shard_range",
]

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "DIFFEO_ENGINE_DIST_TIMEOUT"
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
    # the Gloo group for Python objects (None: the default group, itself Gloo)
    object_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """This rank's share of ``range(n)``."""
        return shard_range(n, self.rank, self.world_size)

    def _collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _failing_clearly(self, what)

    def _device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place on a copy); identity on one process."""
        if not self.active:
            return tensor
        buffer = tensor.detach().to(self._device()).clone()
        with self._collective("all-reduce"):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank (the others pass one of the same shape
        and dtype); identity on one process."""
        if not self.active:
            return tensor
        buffer = tensor.detach().to(self._device()).clone()
        with self._collective("broadcast"):
            dist.broadcast(buffer, src=src)
        return buffer.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order; ``[obj]`` on one process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("all-gather"):
            dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (the others' ``obj`` is ignored)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=src, group=self.object_group)
        return box[0]

    def barrier(self) -> None:
        if not self.active:
            return
        with self._collective("barrier"):
            dist.barrier(group=self.object_group)


@contextlib.contextmanager
def _failing_clearly(ctx: DistributedContext, what: str) -> Iterator[None]:
    """Turn a failed collective into :class:`DistributedError` naming rank and operation."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as error:  # includes dist.DistBackendError
        raise DistributedError(
            f"rank {ctx.rank}: {what} across {ctx.world_size} processes failed "
            f"(did another rank die?): {error}"
        ) from error


def resolve_timeout(timeout_s: float | None = None) -> float:
    """``timeout_s``, else ``$DIFFEO_ENGINE_DIST_TIMEOUT``, else 300 seconds."""
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV)
        if not text:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}: expected seconds, got {text!r}") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise TypeError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    return float(timeout_s)


@contextlib.contextmanager
def distributed_session(
    device: str | torch.device | None = None, *, timeout_s: float | None = None
) -> Iterator[DistributedContext]:
    """Initialise the process group when launched by torchrun; yield the context.

    Without the launch variables (or with ``WORLD_SIZE=1``) this yields a one-process
    context and touches nothing. On CUDA each rank takes ``cuda:LOCAL_RANK``. Every
    collective fails after ``timeout_s`` (default: ``$DIFFEO_ENGINE_DIST_TIMEOUT``, else
    300 s) if a rank does not join it.
    """
    if timeout_s is not None:
        resolve_timeout(timeout_s)  # a bad value is refused with or without torchrun
    if not in_torchrun():
        yield DistributedContext()
        return
    timeout = datetime.timedelta(seconds=resolve_timeout(timeout_s))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.device(device).type == "cuda" if device is not None else False
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        try:
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        except RuntimeError as error:  # includes the store's timeout (DistStoreError)
            raise DistributedError(
                f"rank {rank}: could not form the group of {world_size} processes at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                f"{timeout.total_seconds():g} s (did another rank fail to start?): {error}"
            ) from error
    try:
        objects = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        yield DistributedContext(rank, world_size, local_rank, backend, objects)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
