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
    from ..train import read_metrics
    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train and "returns" in train[-1]:  # meta-RL: returns before and after adapting
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["returns"][0] for r in train], label="train return before adapting")
        axes[0].plot(steps, [r["returns"][-1] for r in train], label="train return after adapting")
    else:
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train query loss")
        if val:
            axes[0].plot([r["step"] for r in val], [r["val"]["loss"][-1] for r in val], "o-", label="val query loss")
    axes[0].set_xlabel("meta-iteration")
    if axes[0].lines:
        axes[0].legend()
    if not train:
        axes[0].text(0.5, 0.5, "no training loss logged yet\n(--log-every is longer than the run)",
                     ha="center", va="center", transform=axes[0].transAxes)
    for key in ("accuracy", "returns"):
        if val and key in val[-1]["val"]:
            axes[1].plot([r["step"] for r in val], [r["val"][key][-1] for r in val], "o-",
                         label=f"val {'accuracy' if key == 'accuracy' else 'return after adapting'}")
            axes[1].set_xlabel("meta-iteration")
            axes[1].legend()
    fig.tight_layout()
    curves = run / "learning_curves.png"
    fig.savefig(curves, dpi=100)
    paths = [curves]
    if val:
        fig, ax = plt.subplots(figsize=(5, 4))
        v = val[-1]["val"]
        key = next(k for k in ("accuracy", "returns", "loss") if k in v)
        ci = key + "_ci"
        ax.errorbar(range(len(v[key])), v[key], yerr=v[ci], marker="o", capsize=3)
        ax.set_xlabel("inner step")
        ax.set_ylabel(f"validation {key}")
        ax.set_title(f"after {val[-1]['step']} meta-iterations")
        fig.tight_layout()
        steps_plot = run / "inner_steps.png"
        fig.savefig(steps_plot, dpi=100)
        paths.append(steps_plot)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    if (config.get("rl") or {}).get("env") == "navigation-2d":
        paths.append(_navigation_paths(run, plt))
    for p in paths:
        print(p)
    return 0


def _navigation_paths(run: Path, plt) -> Path:
    """Four test goals: a trajectory of the meta-trained policy before adapting and after each step."""
    import torch

    from .. import experiment
    from . import common

    loaded = experiment.load_run(run, device="cpu", builder=common.build_learner)
    learner, config = loaded.learner, loaded.config
    goals = common.build_tasks(config, splits=("test",))["test"][0].tasks[:4]
    with torch.no_grad():
        _, _, sampled = learner.collect(goals, config.algorithm.inner_steps_test, test=True)
    fig, axes = plt.subplots(1, len(goals), figsize=(4 * len(goals), 4))
    for task, ax in enumerate(axes):
        for step, trajectories in enumerate(sampled):
            steps = int(trajectories.mask[task, 0].sum())
            path = torch.cat([torch.zeros(1, 2), trajectories.observations[task, 0, :steps].float()])
            ax.plot(path[:, 0], path[:, 1], "--" if step == 0 else "-",
                    label="before adapting" if step == 0 else f"after {step} step{'s' if step > 1 else ''}")
        ax.plot(*goals[task].tolist(), "k*", markersize=12, label="goal")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{run.name}: trajectories (step {loaded.state.get('step', '?')})")
    fig.tight_layout()
    path = run / "trajectories.png"
    fig.savefig(path, dpi=100)
    return path
