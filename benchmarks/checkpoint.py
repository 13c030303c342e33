"""What checkpointing costs: one ``last.pt`` save against one meta-iteration of the default run
(Glyphs, conv4-64, 5-way 1-shot, 8 tasks, 3 inner steps), and the share of training time that the
wall-clock interval (``--checkpoint-every``, default 300 s) and a save after every iteration take.

    python benchmarks/checkpoint.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fastadapt import experiment
from fastadapt.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    config = experiment.resolve(dict(meta_steps=10 ** 9))
    torch.manual_seed(0)
    learner = experiment.build_learner(config)
    sources = experiment.build_data(config, splits=("train",))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(learner, sources["train"], config, folder)
        stream = iter(trainer.tasks)
        steps, saves = [], []
        for _ in range(args.reps):
            batch = next(stream)
            start = time.perf_counter()
            trainer.optimizer.zero_grad()
            learner.meta_backward(batch)
            trainer.optimizer.step()
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.save("last.pt")
            saves.append(time.perf_counter() - start)
    step, save = statistics.median(steps[1:]), statistics.median(saves[1:])
    size = sum(p.numel() for p in learner.parameters())
    print(f"default run (conv4-64, {size} weights + Adam state), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, medians of {args.reps - 1}")
    print(f"one meta-iteration      {step * 1000:9.1f} ms")
    print(f"one last.pt save        {save * 1000:9.1f} ms (temporary file, fsync, rename)")
    print(f"cost, every 300 s       {100 * save / 300:9.4f} % of training time")
    print(f"cost, every iteration   {100 * save / (step + save):9.2f} % of training time")


if __name__ == "__main__":
    main()
