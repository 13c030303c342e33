"""Meta-iterations per second with 1 and with N processes (torch.distributed, gloo on CPU).

The Omniglot setting of benchmarks/meta_step.py: conv4-64, 28x28, 5-way 1-shot, 15 queries per
class, a meta-batch of 32 tasks, 5 inner steps, second order. With N processes each computes the
meta-gradient of 32/N tasks and the gradients are all-reduced, as ``fastadapt train`` does under
torchrun. The machine's cores are split evenly: one process gets all of them as threads, N
processes get cores/N threads each, so the ratio measures what distribution itself costs or gains.

    python benchmarks/distributed.py [--procs 2] [--iters 5]

On a multi-GPU host, time real training instead, e.g.
    torchrun --nproc-per-node 8 -m fastadapt train --preset miniimagenet-5w1s --root DATA --device cuda
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from fastadapt import MAML, TaskBatch, distributed
from fastadapt.models import conv4

TASKS = 32


def batch(tasks):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5)
    return TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=g), labels.repeat(tasks, 1),
                     torch.rand(tasks, 75, 1, 28, 28, generator=g), labels.repeat_interleave(15).repeat(tasks, 1))


def run(rank, world, port, threads, iters, out):
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ctx = distributed.init("cpu")
    torch.manual_seed(0)
    model = conv4()
    maml = MAML(model, inner_lr=0.4, inner_steps=5)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    local = batch(TASKS)[distributed.task_slice(TASKS, ctx)]
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        maml.meta_backward(local)
        distributed.average_gradients(maml.parameters(), ctx)
        optimizer.step()
        times.append(time.perf_counter() - start)
    if ctx.is_main:
        out.put(statistics.median(times[1:]))
    distributed.shutdown()


def measure(world, threads, iters):
    queue = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(world, port, threads, iters, queue), nprocs=world)
    return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count()
    one = measure(1, cores, args.iters)
    many = measure(args.procs, max(1, cores // args.procs), args.iters)
    print(f"{cores} cores; conv4-64 Omniglot 5w1s, {TASKS} tasks, 5 inner steps, second order")
    print(f"{'processes':>9s} {'threads each':>12s} {'s / meta-iter':>13s} {'meta-iter / s':>13s}")
    print(f"{1:9d} {cores:12d} {one:13.3f} {1 / one:13.2f}")
    print(f"{args.procs:9d} {max(1, cores // args.procs):12d} {many:13.3f} {1 / many:13.2f}")
    print(f"speed-up {one / many:.2f}x, scaling efficiency {one / many / args.procs:.0%} of ideal "
          f"(the processes share the same {cores} cores: any gain here is one-thread processes avoiding "
          f"multi-threading overhead on small operations, not more hardware)")


if __name__ == "__main__":
    main()
