"""The ``fastadapt`` command line. It only wires the library's pieces together."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _sinusoid(args) -> int:
    from . import MAML, Sinusoid
    from .models import mlp

    torch.manual_seed(args.seed)
    maml = MAML(mlp(), inner_lr=args.inner_lr, inner_steps=args.inner_steps, loss="mse")
    test = Sinusoid(k_shot=args.k_shot, k_query=args.k_shot, seed=args.seed + 1).sample(600)
    before = maml.fine_tune(test, steps=args.inner_steps_test)
    tasks = Sinusoid(k_shot=args.k_shot, k_query=args.k_shot, seed=args.seed)
    optimizer = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        out = maml.meta_backward(tasks.sample(args.task_batch))
        optimizer.step()
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step:6d}  query MSE after adaptation {out.loss.item():.4f}", flush=True)
    after = maml.fine_tune(test, steps=args.inner_steps_test)
    print(f"\nmeta-trained {args.steps} steps in {time.perf_counter() - start:.1f} s; "
          f"600 test tasks, K={args.k_shot}:")
    print(f"{'inner step':>10s} {'MSE before meta-training':>25s} {'MSE after':>10s}")
    for i, (b, a) in enumerate(zip(before.query_loss.tolist(), after.query_loss.tolist())):
        print(f"{i:10d} {b:25.4f} {a:10.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description="Fast gradient-based meta-learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sin = sub.add_parser("sinusoid", help="meta-train MAML on the MAML paper's sinusoid regression tasks")
    sin.add_argument("--steps", type=int, default=2000)
    sin.add_argument("--k-shot", type=int, default=10)
    sin.add_argument("--task-batch", type=int, default=25)
    sin.add_argument("--inner-lr", type=float, default=0.01)
    sin.add_argument("--inner-steps", type=int, default=1)
    sin.add_argument("--inner-steps-test", type=int, default=10)
    sin.add_argument("--meta-lr", type=float, default=1e-3)
    sin.add_argument("--seed", type=int, default=0)
    sin.set_defaults(run=_sinusoid)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
