"""Process groups on the CPU with Gloo, launched with torchrun's environment variables."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffeo_engine.distributed import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    DistributedContext,
    DistributedError,
    distributed_session,
    in_torchrun,
    resolve_timeout,
    shard_range,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _reduce_worker(rank, world_size, port, results):
    os.environ.update(torchrun_env(rank, world_size, port))
    with distributed_session("cpu", timeout_s=30) as ctx:
        share = ctx.shard(10)
        partial = torch.tensor([float(sum(share)), 1.0 / 3.0], dtype=torch.float64)
        total = ctx.all_reduce_sum(partial)
        results[rank] = (ctx.rank, ctx.world_size, ctx.backend, list(share), total.tolist())
        gathered = ctx.all_gather_object({"rank": rank, "share": list(share)})
        sent = ctx.broadcast_object({"from": rank}, src=ctx.world_size - 1)
        tensor = ctx.broadcast(torch.full((2,), float(rank), dtype=torch.float64), src=1)
        results[f"{rank}-objects"] = (gathered, sent, tensor.tolist())


def _dying_worker(rank, world_size, port, results):
    os.environ.update(torchrun_env(rank, world_size, port))
    with distributed_session("cpu", timeout_s=5) as ctx:
        ctx.barrier()
        if rank == 1:
            os._exit(3)  # dies without a word, like a killed process
        try:
            ctx.all_reduce_sum(torch.ones(1, dtype=torch.float64))
            ctx.barrier()
            results[rank] = "no error"
        except DistributedError as error:
            results[rank] = str(error)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_ids_and_sum_exactly(world_size):
    results = mp.Manager().dict()
    mp.start_processes(
        _reduce_worker,
        args=(world_size, free_port(), results),
        nprocs=world_size,
        start_method="spawn",
    )
    shares = [results[r][3] for r in range(world_size)]
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for rank in range(world_size):
        got_rank, got_world, backend, _, total = results[rank]
        assert (got_rank, got_world, backend) == (rank, world_size, "gloo")
        assert total == [45.0, world_size * (1.0 / 3.0)]
        gathered, sent, tensor = results[f"{rank}-objects"]
        assert gathered == [{"rank": r, "share": shares[r]} for r in range(world_size)]
        assert sent == {"from": world_size - 1}
        assert tensor == [1.0, 1.0]


def test_a_dead_rank_fails_the_others_with_a_clear_error():
    results = mp.Manager().dict()
    context = mp.start_processes(
        _dying_worker,
        args=(2, free_port(), results),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    context.processes[0].join(timeout=60)
    assert not context.processes[0].is_alive(), "rank 0 hung instead of failing"
    context.processes[1].join(timeout=10)
    assert "did another rank die?" in results[0]


def test_without_torchrun_the_session_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not in_torchrun()
    with distributed_session() as ctx:
        assert ctx == DistributedContext()
        assert ctx.is_main and not ctx.active
        assert ctx.shard(5) == range(5)
        t = torch.arange(3.0)
        assert ctx.all_reduce_sum(t) is t


def test_shard_range_is_balanced_and_disjoint():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(5, 2, 2)


def test_a_rank_that_never_starts_fails_the_group_clearly(monkeypatch):
    for name, value in torchrun_env(0, 2, free_port()).items():
        monkeypatch.setenv(name, value)
    session = distributed_session("cpu", timeout_s=1)
    with pytest.raises(DistributedError, match="could not form the group of 2 processes"):
        session.__enter__()


def test_timeout_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert resolve_timeout() == DEFAULT_TIMEOUT_S
    assert resolve_timeout(7) == 7.0
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert resolve_timeout() == 12.5
    assert resolve_timeout(3) == 3.0
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        resolve_timeout()
    with pytest.raises(ValueError, match="timeout_s"):
        resolve_timeout(0)
