"""``fastadapt plot``: a run's learning curves and its accuracy per inner step, as PNG files."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plot", help="learning curves and accuracy per inner step, as PNG")
    p.add_argument("run_dir")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("fastadapt plot needs matplotlib: pip install 'fastadapt[plot]'") from error
    run = Path(args.run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist (is {run} a run folder?)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train query loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val"]["loss"][-1] for r in val], "o-", label="val query loss")
    axes[0].set_xlabel("meta-iteration")
    axes[0].legend()
    if val and "accuracy" in val[-1]["val"]:
        axes[1].plot([r["step"] for r in val], [r["val"]["accuracy"][-1] for r in val], "o-", label="val accuracy")
        axes[1].set_xlabel("meta-iteration")
        axes[1].legend()
    fig.tight_layout()
    curves = run / "learning_curves.png"
    fig.savefig(curves, dpi=100)
    paths = [curves]
    if val:
        fig, ax = plt.subplots(figsize=(5, 4))
        v = val[-1]["val"]
        key, ci = ("accuracy", "accuracy_ci") if "accuracy" in v else ("loss", "loss_ci")
        ax.errorbar(range(len(v[key])), v[key], yerr=v[ci], marker="o", capsize=3)
        ax.set_xlabel("inner step")
        ax.set_ylabel(f"validation {key}")
        ax.set_title(f"after {val[-1]['step']} meta-iterations")
        fig.tight_layout()
        steps_plot = run / "inner_steps.png"
        fig.savefig(steps_plot, dpi=100)
        paths.append(steps_plot)
    for p in paths:
        print(p)
    return 0
