"""MAML-RL on navigation-2d: environment speed, seconds per meta-iteration, and what training learns.

The setting is the MAML paper's 2D navigation as its PyTorch reproduction runs it: 20 tasks x 20
trajectories x horizon 100 per meta-batch, one inner step at 0.1, a 64x64 tanh Gaussian policy,
gamma 0.99, GAE lambda 1, TRPO with max KL 0.01, 10 conjugate-gradient iterations, damping 1e-5,
line search up to 15 steps x 0.8. One torch thread.

- environment steps per second: navigation-2d batched (20 x 20 copies per step) against a
  single copy stepped alone; with ``--cheetah``, halfcheetah-vel's vector environment against a
  bare ``gymnasium.make("HalfCheetah-v5")``;
- seconds per meta-iteration (sampling included), full-data Hessian-vector products and
  ``--hvp-fractions`` of the query trajectories, alternated (median of ``--reps``);
- ``--train N``: N meta-iterations from a fixed seed (``--seeds K``: from each of seeds 0..K-1,
  then the mean over them), then the mean return over 40 seeded test tasks before adapting and
  after 1-3 steps (0.1, then 0.05), with 95% intervals.

    python benchmarks/rl_navigation.py [--reps 3] [--hvp-fractions 1,0.2] [--train 100] [--cheetah]
    python benchmarks/rl_navigation.py --skip-timing --train 100 --hvp-fractions 0.2 --inner-estimators reinforce,lvc
    python benchmarks/rl_navigation.py --skip-timing --train 100 --hvp-fractions 0.1 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastadapt.evaluate import confidence_interval
from fastadapt.rl import MAMLTRPO, GaussianMLPPolicy, family


def build(hvp_fraction: float, seed: int = 0, inner_estimator: str = "reinforce") -> MAMLTRPO:
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, hidden=(64, 64), activation="tanh")
    return MAMLTRPO(policy, family("navigation-2d"), inner_lr=0.1, inner_steps=1, trajectories=20, horizon=100,
                    gamma=0.99, gae_lambda=1.0, max_kl=0.01, cg_iters=10, cg_damping=1e-5, ls_steps=15, ls_ratio=0.8,
                    hvp_fraction=hvp_fraction, seed=seed, inner_estimator=inner_estimator)


def env_speed(make, steps: int, actions) -> float:
    env = make()
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(actions)
    return time.perf_counter() - start


def environment_table(cheetah: bool) -> None:
    nav = family("navigation-2d")
    goals = nav.sample_tasks(20, torch.Generator().manual_seed(0))
    batched = env_speed(lambda: nav.make_env(goals, 20), 1000, torch.full((20, 20, 2), 0.05))
    single = env_speed(lambda: nav.make_env(goals[:1], 1), 1000, torch.full((1, 1, 2), 0.05))
    print(f"navigation-2d, 400 copies a step: {400 * 1000 / batched:12,.0f} env steps/s")
    print(f"navigation-2d, 1 copy a step:     {1000 / single:12,.0f} env steps/s")
    if cheetah:
        import gymnasium as gym
        import numpy as np
        vel = family("halfcheetah-vel")
        tasks = vel.sample_tasks(4, torch.Generator().manual_seed(0))
        vector = env_speed(lambda: vel.make_env(tasks, 5), 200, torch.zeros(4, 5, 6))
        bare = gym.make("HalfCheetah-v5")
        bare.reset(seed=0)
        start = time.perf_counter()
        for _ in range(4000):
            bare.step(np.zeros(6))
        alone = time.perf_counter() - start
        print(f"halfcheetah-vel, 20 copies (SyncVectorEnv): {20 * 200 / vector:9,.0f} env steps/s")
        print(f"HalfCheetah-v5 alone:                       {4000 / alone:9,.0f} env steps/s")


def iteration_table(fractions, reps: int) -> None:
    nav = family("navigation-2d")
    learners = {f: build(f) for f in fractions}
    optimizers = {f: learner.make_optimizer(1e-3) for f, learner in learners.items()}
    streams = {f: torch.Generator().manual_seed(0) for f in fractions}
    times = {f: [] for f in fractions}
    for rep in range(reps + 1):
        for f, learner in learners.items():
            learner.on_step(rep)
            tasks = nav.sample_tasks(20, streams[f])
            start = time.perf_counter()
            learner.train_step(tasks, optimizers[f])
            if rep:
                times[f].append(time.perf_counter() - start)
    print(f"{'Hessian-vector products on':32s} {'s / meta-iteration':>18s}")
    for f, values in times.items():
        label = "all query trajectories" if f == 1 else f"{f:.0%} of them (and of the support)"
        print(f"{label:32s} {statistics.median(values):18.2f}")


def train_and_test(iterations: int, fraction: float, inner_estimator: str = "reinforce", seed: int = 0):
    nav = family("navigation-2d")
    learner = build(fraction, seed=seed, inner_estimator=inner_estimator)
    optimizer, stream = learner.make_optimizer(1e-3), torch.Generator().manual_seed(seed)
    test = nav.sample_tasks(40, torch.Generator().manual_seed(12345))
    start = time.perf_counter()
    for step in range(iterations):
        learner.on_step(step)
        learner.train_step(nav.sample_tasks(20, stream), optimizer)
    seconds = time.perf_counter() - start
    returns = learner.fine_tune(test, inner_steps=3).returns.double()
    mean, ci = returns.mean(0), confidence_interval(returns)
    print(f"{iterations} meta-iterations ({inner_estimator} inner loss, Hessian-vector products on {fraction:.0%}, "
          f"seed {seed}) in {seconds:.0f} s; 40 test tasks, mean return and 95% CI:")
    for step in range(returns.shape[1]):
        what = "before adapting" if step == 0 else f"after {step} step{'s' if step > 1 else ''}"
        print(f"  {what:16s} {mean[step]:8.2f} ± {ci[step]:.2f}")
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hvp-fractions", default="1,0.2")
    parser.add_argument("--train", type=int, default=0, metavar="N")
    parser.add_argument("--cheetah", action="store_true")
    parser.add_argument("--seeds", type=int, default=1, help="with --train: train from seeds 0..K-1")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--inner-estimators", default="reinforce",
                        help="with --train: comma-separated inner losses to train with (reinforce, lvc)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fractions = [float(f) for f in args.hvp_fractions.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    if not args.skip_timing:
        environment_table(args.cheetah)
        iteration_table(fractions, args.reps)
    if args.train:
        for estimator in args.inner_estimators.split(","):
            for f in fractions:
                means = torch.stack([train_and_test(args.train, f, estimator, seed) for seed in range(args.seeds)])
                if args.seeds > 1:
                    print(f"mean over {args.seeds} seeds ({estimator}, {f:.0%}): "
                          + ", ".join(f"{m:.2f}" for m in means.mean(0).tolist())
                          + " (before adapting, after 1, 2, 3 steps)")


if __name__ == "__main__":
    main()
