"""Evaluation time of the pretrained baseline's heads against ProtoNet's on the same tasks.

600 20-way 1-shot tasks (one query per class, as in Lake's protocol) of 28x28 images, in
batches of 25, through ``fastadapt.evaluate`` with the same conv4 (64 filters) for every learner.
The sides are interleaved and each is timed ``--reps`` times; medians, and each head's time as a
ratio to ProtoNet's (issue 22's target: the logistic head at most 3x).

    python benchmarks/heads.py [--reps 3] [--tasks 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastadapt import TaskBatch, evaluate
from fastadapt.algorithms.pretrain import HEADS, Pretrain
from fastadapt.algorithms.protonet import ProtoNet
from fastadapt.models import conv4


def tasks(count: int, batch: int, ways: int = 20):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat(batch, 1)
    return [TaskBatch(torch.rand(batch, ways, 1, 28, 28, generator=g), labels,
                      torch.rand(batch, ways, 1, 28, 28, generator=g), labels)
            for _ in range(count // batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    episodes = tasks(args.tasks, 25)
    body = conv4(1, 544, hidden=64, image_size=28)
    learners = {"protonet": ProtoNet(conv4(1, 20, hidden=64, image_size=28), n_way=20),
                **{head: Pretrain(body, head=head) for head in HEADS}}
    learners["protonet"].model.features.load_state_dict(body.features.state_dict())
    for learner in learners.values():  # warm-up: first calls pay for torch.func's imports
        evaluate(learner, episodes[:1], 1)
    times = {name: [] for name in learners}
    for _ in range(args.reps):
        for name, learner in learners.items():
            start = time.perf_counter()
            evaluate(learner, episodes, 1)  # the fine-tuned head: one step
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["protonet"])
    print(f"{len(episodes) * 25} tasks of 20-way 1-shot, {args.threads} thread(s), median of {args.reps}:")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"  {name:9s} {median:7.2f} s   x{median / reference:.2f} of ProtoNet's")


if __name__ == "__main__":
    main()
