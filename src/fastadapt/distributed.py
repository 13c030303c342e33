"""The one place that knows about ranks: torch.distributed set-up, gradient averaging, sharding.

Data parallelism over tasks: with W processes and a meta-batch of T tasks, rank r meta-trains on
tasks ``[r T/W, (r+1) T/W)`` of every meta-batch, and the ranks average their meta-gradients with
one all-reduce before the optimiser step, so the update equals a single process's on all T tasks.
Launch with ``torchrun``; without its environment everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Context()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu", timeout_s: float = None) -> Context:
    """Join the process group described by torchrun's environment (gloo on CPU, NCCL on CUDA).

    ``timeout_s`` (default ``FASTADAPT_DIST_TIMEOUT`` or 300 s) bounds every collective, so a rank
    that dies makes the others fail with an error instead of waiting for ever.
    """
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    if not launched_by_torchrun():
        return SINGLE
    timeout_s = float(timeout_s or os.environ.get("FASTADAPT_DIST_TIMEOUT", 300))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group together: every rank waits at a barrier first, so no rank tears
    down its connections while a peer is still using them (gloo can abort a process whose peer
    closed a socket under it)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def device_for(device: str) -> str:
    """On CUDA, one GPU per local rank."""
    if str(device) == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def task_slice(num_tasks: int, ctx: Context) -> slice:
    if num_tasks % ctx.world_size:
        raise ValueError(f"the meta-batch of {num_tasks} tasks does not split evenly over {ctx.world_size} "
                         "processes: make --task-batch a multiple of the number of processes")
    share = num_tasks // ctx.world_size
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


def average_gradients(parameters, ctx: Context) -> None:
    """Average ``.grad`` over ranks with a single all-reduce of one flat buffer."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging the global meta-loss)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ctx.world_size


def maximum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Elementwise maximum of a tensor over ranks."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def shard(items: Sequence, ctx: Context) -> List:
    """This rank's items: every ``world_size``-th one, starting at ``rank``."""
    return list(items)[ctx.rank::ctx.world_size]


def gather(local: list, ctx: Context) -> list:
    """Concatenate every rank's list, in rank order, on every rank."""
    if not ctx.enabled:
        return list(local)
    everything = [None] * ctx.world_size
    dist.all_gather_object(everything, list(local))
    return [item for part in everything for item in part]


def current() -> Context:
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return SINGLE
