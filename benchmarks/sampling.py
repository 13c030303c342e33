"""Episode sampling and data loading speed, against the time of one meta-step.

Omniglot: the real minimal background set from ../shared/data/omniglot (5-way 1-shot, 15 queries,
32 tasks, 28x28). miniImageNet: a generated stand-in of 64 classes x 60 images at 84x84
(5-way 1-shot, 15 queries, 4 tasks). Each is sampled in-process and through a DataLoader with 2
workers; the share is sampling time over the meta-step time measured in the same run.

    python benchmarks/sampling.py [--root ../shared/data/omniglot] [--episodes 50]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from fastadapt import MAML
from fastadapt.data import EpisodeSampler, ImageSet, Omniglot
from fastadapt.models import conv4

ROOT = Path(__file__).resolve().parents[1]


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate(sampler, episodes, workers):
    if workers:
        source = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=workers,
                                             persistent_workers=False, prefetch_factor=4)
    else:
        source = sampler
    stream = iter(source)
    next(stream)  # start-up (worker processes) is not counted
    start = time.perf_counter()
    for _ in range(episodes):
        next(stream)
    return episodes / (time.perf_counter() - start)


def meta_step_seconds(batch, model, reps=3):
    maml = MAML(model, inner_lr=0.4, inner_steps=5)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        maml.meta_backward(batch)
        times.append(time.perf_counter() - start)
        model.zero_grad()
    return sorted(times[1:])[len(times[1:]) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--episodes", type=int, default=50)
    args = parser.parse_args()

    print("Omniglot background_small1 (136 characters x 20 drawings) load:")
    with tempfile.TemporaryDirectory() as cache:
        before = rss_mib()
        start = time.perf_counter()
        omniglot = Omniglot(args.root, "background_small1", cache=cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        Omniglot(args.root, "background_small1", cache=cache)
        cached = time.perf_counter() - start
    print(f"  from zip {first:.2f} s, from .npy cache {cached:.3f} s, images {omniglot.images.nbytes / 2**20:.1f} MiB, "
          f"peak RSS growth {rss_mib() - before:.0f} MiB\n")

    g = torch.Generator().manual_seed(0)
    mini = ImageSet(torch.randint(0, 256, (64 * 60, 3, 84, 84), dtype=torch.uint8, generator=g),
                    torch.arange(64).repeat_interleave(60), [f"n{c:03d}" for c in range(64)])
    settings = [
        ("Omniglot 5w1s q15 x32, 28x28", omniglot, 32, conv4(1, 5, 64, 28)),
        ("miniImageNet 5w1s q15 x4, 84x84", mini, 4, conv4(3, 5, 32, 84, pool="max")),
    ]
    print(f"{'setting':34s} {'episodes/s':>10s} {'2 workers':>10s} {'meta-step s':>11s} {'share':>6s} {'2w share':>8s}")
    for name, data, tasks, model in settings:
        sampler = EpisodeSampler(data, 5, 1, 15, tasks)
        single = rate(sampler, args.episodes, 0)
        pooled = rate(sampler, args.episodes, 2)
        step = meta_step_seconds(next(iter(sampler)), model)
        print(f"{name:34s} {single:10.1f} {pooled:10.1f} {step:11.3f} {1 / single / step:6.1%} {1 / pooled / step:8.1%}",
              flush=True)
    print("\nshare: time to sample one meta-batch / time of one second-order meta-step (target < 5%)")


if __name__ == "__main__":
    main()
