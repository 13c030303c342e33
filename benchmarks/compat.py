"""``fastadapt.compat.Meta.forward`` against loops over tasks written as the reference code is.

The setting is the MAML-Pytorch reference's Omniglot run: its config-list network (4 convolutions
of 64 filters with bias, ReLU, BatchNorm), 28x28 inputs, 5-way 1-shot, 15 queries per class, 32
tasks, 5 inner steps at 0.4, Adam at 1e-3. Both loops use a functional forward written from the
config list the way the reference's ``Learner.forward(x, vars, bn_training=True)`` is (``F.conv2d``,
``F.batch_norm`` in training mode), with ``create_graph=True`` so that every side computes the same
second-order meta-gradient, then take the same Adam step:

- reference-style: keeps every step's query loss with its graph, as the reference's ``losses_q`` does;
- lean + accuracies: scores the earlier steps' query sets without a graph, so that it returns the
  same per-step accuracies as ``Meta.forward`` (the fair strongest loop);
- lean, no accuracies: scores the query set once, after the last step (less work than the
  reference's contract asks: shown for the engine's own margin). Timings are
interleaved (the machine is shared and noisy); medians and ratios from one run.

    python benchmarks/compat.py [--reps 5] [--task-num 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastadapt.compat import Meta
from fastadapt.models import omniglot_config


def reference_forward(config, x, weights):
    """The reference ``Learner.forward`` with ``bn_training=True``: one functional pass."""
    index = 0
    for name, args in config:
        if name == "conv2d":
            x = F.conv2d(x, weights[index], weights[index + 1], stride=args[4], padding=args[5])
            index += 2
        elif name == "bn":
            x = F.batch_norm(x, None, None, weights[index], weights[index + 1], training=True)
            index += 2
        elif name == "relu":
            x = F.relu(x)
        elif name == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif name == "linear":
            x = F.linear(x, weights[index], weights[index + 1])
            index += 2
        else:
            raise ValueError(f"benchmark forward: layer {name!r} not written here")
    return x


def loop_step(config, weights, optimizer, args, data, scoring: str):
    """One meta-iteration. ``scoring``: "seed" keeps every step's query loss with its graph (as
    the reference's ``losses_q``); "accuracy" scores the earlier steps' queries without a graph,
    for the same per-step accuracies ``Meta.forward`` returns; "final" scores the last step only."""
    x_spt, y_spt, x_qry, y_qry = data
    optimizer.zero_grad()
    total, kept, correct = 0, [], torch.zeros(args.update_step + 1)
    for i in range(x_spt.shape[0]):
        fast = weights
        for k in range(args.update_step):
            if scoring == "seed":
                logits = reference_forward(config, x_qry[i], fast)
                kept.append(F.cross_entropy(logits, y_qry[i]))
                correct[k] += (logits.argmax(1) == y_qry[i]).float().mean().item()
            elif scoring == "accuracy":
                with torch.no_grad():
                    correct[k] += (reference_forward(config, x_qry[i], fast).argmax(1) == y_qry[i]).float().mean()
            loss = F.cross_entropy(reference_forward(config, x_spt[i], fast), y_spt[i])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - args.update_lr * g for w, g in zip(fast, grads)]
        logits = reference_forward(config, x_qry[i], fast)
        correct[-1] += (logits.argmax(1) == y_qry[i]).float().mean().item()
        total = total + F.cross_entropy(logits, y_qry[i])
    (total / x_spt.shape[0]).backward()
    optimizer.step()
    return correct / x_spt.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--task-num", type=int, default=32)
    parser.add_argument("--update-step", type=int, default=5)
    cli = parser.parse_args()
    args = argparse.Namespace(update_lr=0.4, meta_lr=1e-3, n_way=5, k_spt=1, k_qry=15, task_num=cli.task_num,
                              update_step=cli.update_step, update_step_test=10, imgc=1, imgsz=28)
    config = omniglot_config(args.n_way)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(args.n_way)
    data = (torch.rand(args.task_num, args.n_way * args.k_spt, 1, 28, 28, generator=g),
            labels.repeat_interleave(args.k_spt).repeat(args.task_num, 1),
            torch.rand(args.task_num, args.n_way * args.k_qry, 1, 28, 28, generator=g),
            labels.repeat_interleave(args.k_qry).repeat(args.task_num, 1))
    torch.manual_seed(0)
    meta = Meta(args, config)
    loops = {"reference-style loop": "seed", "lean loop + accuracies": "accuracy", "lean loop, no accuracies": "final"}
    runs = {"compat.Meta.forward": lambda: meta(*data)}
    for name, scoring in loops.items():
        weights = [w.detach().clone().requires_grad_() for w in meta.net.parameters()]
        optimizer = torch.optim.Adam(weights, lr=args.meta_lr)
        runs[name] = (lambda w, o, s: lambda: loop_step(config, w, o, args, data, s))(weights, optimizer, scoring)
    for run in runs.values():  # warm-up (first-call imports and allocations)
        run()
    times = {name: [] for name in runs}
    for _ in range(cli.reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"reference Omniglot setting: 5-way 1-shot, 15 queries, {args.task_num} tasks, {args.update_step} "
          f"second-order steps; torch {torch.__version__}, {torch.get_num_threads()} threads, median of {cli.reps}")
    print(f"{'implementation':<22s} {'s/iteration':>12s} {'compat speed-up':>16s}")
    for name, seconds in median.items():
        print(f"{name:<22s} {seconds:12.3f} {seconds / median['compat.Meta.forward']:15.2f}x")


if __name__ == "__main__":
    main()
