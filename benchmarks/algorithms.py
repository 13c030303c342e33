"""Seconds per meta-iteration of every algorithm on the shared Omniglot-sized setting.

conv4-64, 28x28, 5-way 1-shot, 15 queries per class, 32 tasks, 5 inner steps (inner lr 0.4; 0.05
for Reptile), one ``train_step`` (gradient and update) per iteration, median of ``--reps``
after a warm-up, all in one run so the ratios are comparable on a noisy machine.

    python benchmarks/algorithms.py [--reps 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastadapt.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from fastadapt.data import TaskBatch
from fastadapt.models import conv4

TASKS, STEPS = 32, 5


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5)
    return TaskBatch(torch.rand(TASKS, 5, 1, 28, 28, generator=g), labels.repeat(TASKS, 1),
                     torch.rand(TASKS, 75, 1, 28, 28, generator=g),
                     labels.repeat_interleave(15).repeat(TASKS, 1)).to(device)


ALGORITHMS = {
    "MAML (second order)": lambda m: MAML(m, 0.4, STEPS),
    "first-order MAML": lambda m: MAML(m, 0.4, STEPS, first_order=True),
    "MAML++ (all options)": lambda m: MAMLPlusPlus(m, 0.4, STEPS, lslr=True, multi_step_loss=100, per_step_bn=True),
    "Meta-SGD": lambda m: MetaSGD(m, 0.4, STEPS),
    "ANIL (second order)": lambda m: ANIL(m, 0.4, STEPS),
    "Reptile (SGD inner)": lambda m: Reptile(m, 0.05, STEPS),
    "ProtoNet": lambda m: ProtoNet(m, n_way=5),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    batch = make_batch(args.device)
    learners = {}
    for name, build in ALGORITHMS.items():
        torch.manual_seed(0)
        learner = build(conv4()).to(args.device)
        learners[name] = (learner, learner.make_optimizer(1e-3))
    times = {name: [] for name in learners}
    for rep in range(args.reps + 1):
        for name, (learner, optimizer) in learners.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            learner.train_step(batch, optimizer)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["MAML (second order)"])
    print(f"{torch.get_num_threads()} threads, {args.device}; {TASKS} tasks 5-way 1-shot 15 queries, {STEPS} inner steps")
    print(f"{'algorithm':24s} {'s / meta-iteration':>18s} {'vs MAML':>8s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:24s} {median:18.3f} {median / base:7.2f}x")


if __name__ == "__main__":
    main()
