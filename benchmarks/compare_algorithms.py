"""Every algorithm on the same tasks: train and test each through the command line, print a table.

Each (setting, algorithm) pair is one ``fastadapt train`` run into ``RUNS/<setting>/<algo>``; a run
whose ``test.json`` exists is not repeated, so the script can be stopped and started again, or
run in several processes over disjoint ``--algos``. Budgets are equal within a setting: the same
tasks, meta-batch, number of meta-iterations and test episodes for every algorithm. The table
gives the test accuracy (or MSE) after one and after the last test step with 95% intervals, and
the median seconds per meta-iteration, timed afterwards with the algorithms interleaved in one
process on the same meta-batch (the training runs themselves may share the machine).

    python benchmarks/compare_algorithms.py --omniglot ../shared/data/omniglot [--algos maml,anil]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALGOS = ("maml", "fomaml", "mamlpp", "metasgd", "anil", "reptile", "protonet")

_SMALL2_UNSEEN = "Japanese_(katakana),Sanskrit,Tagalog"
_FIVE_WAY = ["--n-way", "5", "--k-shot", "1", "--k-query", "15", "--task-batch", "8", "--inner-steps", "1",
             "--inner-lr", "0.4", "--inner-steps-test", "3", "--steps", "500"]
_TWENTY_WAY = ["--n-way", "20", "--k-shot", "1", "--k-query", "5", "--task-batch", "4", "--inner-steps", "5",
               "--inner-lr", "0.1", "--inner-steps-test", "5", "--steps", "200"]


def settings(omniglot_root: str) -> dict:
    omniglot = ["--dataset", "omniglot", "--root", omniglot_root, "--train-split", "background_small1",
                "--val-split", "background_small2", "--val-alphabets", _SMALL2_UNSEEN]
    sinusoid = ["--preset", "sinusoid", "--steps", "3000", "--eval-every", "3000"]
    return {
        "sinusoid-k5": sinusoid + ["--k-shot", "5", "--k-query", "5"],
        "sinusoid-k10": sinusoid + ["--k-shot", "10", "--k-query", "10"],
        "omniglot-minimal-5w1s": omniglot + _FIVE_WAY,
        "omniglot-minimal-20w1s": omniglot + _TWENTY_WAY,
        "glyphs-5w1s": ["--dataset", "glyphs"] + _FIVE_WAY,
        "glyphs-20w1s": ["--dataset", "glyphs"] + _TWENTY_WAY,
    }


def algorithm_options(algo: str, setting: str) -> list:
    """Per-algorithm options where a method cannot work with MAML's: Reptile, whose update is the
    distance the inner loop travels, needs several inner steps (one step of SGD would make it
    plain joint training), and ProtoNet has no inner loop and no regression head."""
    if algo == "reptile":
        if setting.startswith("sinusoid"):
            return ["--inner-steps", "5", "--inner-lr", "0.02", "--outer-lr", "1.0", "--cosine"]
        return ["--inner-steps", "5", "--inner-lr", "0.05", "--inner-steps-test", "10", "--outer-lr", "1.0",
                "--cosine"]
    return []


def run(setting: str, algo: str, options: list, out: Path) -> dict:
    result_file = out / "test.json"
    if not result_file.exists():
        command = [sys.executable, "-m", "fastadapt", "train", *options, "--algo", algo,
                   *algorithm_options(algo, setting), "--val-episodes", "100", "--quiet", "--out", str(out)]
        if "--eval-every" not in options:
            command += ["--eval-every", options[options.index("--steps") + 1]]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(result_file.read_text())


def time_iterations(setting: str, options: list, algos: list, reps: int) -> dict:
    """Median seconds per meta-iteration of each algorithm, interleaved in this one process on
    the same meta-batch, so that the ratios hold on a shared machine."""
    import torch

    from fastadapt import cli, experiment

    learners, batch = {}, None
    for algo in algos:
        config = cli.train_config([*options, "--algo", algo, *algorithm_options(algo, setting)])
        torch.manual_seed(0)
        learner = experiment.build_learner(config)
        if batch is None:
            batch = next(iter(experiment.build_data(config, splits=("train",))["train"]))
        learners[algo] = (learner, learner.make_optimizer(config.training.meta_lr), config)
    seconds = {algo: [] for algo in algos}
    for rep in range(reps + 1):
        for algo, (learner, optimizer, config) in learners.items():
            # halfway through training: MAML++'s derivative-order annealing is second order by then
            learner.on_step(config.training.meta_steps // 2)
            start = time.perf_counter()
            learner.train_step(batch, optimizer)
            if rep:
                seconds[algo].append(time.perf_counter() - start)
    return {algo: statistics.median(values) for algo, values in seconds.items()}


def row(setting: str, algo: str, result: dict, per_iteration: float) -> str:
    regression = setting.startswith("sinusoid")
    values = result["loss" if regression else "accuracy"]
    halfwidths = result["loss_ci" if regression else "accuracy_ci"]
    scale = 1 if regression else 100
    unit = "" if regression else "%"
    digits = 3 if regression else 2

    def cell(step):
        if not math.isfinite(values[step]):
            return f"diverges ({values[step]})"
        return f"{values[step] * scale:.{digits}f} ± {halfwidths[step] * scale:.{digits}f}{unit}"

    return (f"| {setting} | {algo} | {values[0] * scale:.{digits}f}{unit} | {cell(1)} | {cell(-1)} | "
            f"{len(values) - 1} | {per_iteration:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omniglot", default=str(Path(__file__).resolve().parents[2] / "shared/data/omniglot"),
                        help="folder holding the Omniglot minimal zips")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--settings", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--runs", default="runs/compare")
    parser.add_argument("--reps", type=int, default=5, help="timed meta-iterations of each algorithm")
    args = parser.parse_args()
    table = settings(args.omniglot)
    chosen = args.settings.split(",") if args.settings else list(table)
    lines = ["| setting | algorithm | before adapting | after 1 step | after the last test step | test steps | "
             "s / meta-iteration |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for setting in chosen:
        algos = [a for a in args.algos.split(",") if not (a == "protonet" and setting.startswith("sinusoid"))]
        results = {algo: run(setting, algo, table[setting], Path(args.runs) / setting / algo) for algo in algos}
        seconds = time_iterations(setting, table[setting], algos, args.reps)
        lines += [row(setting, algo, results[algo], seconds[algo]) for algo in algos]
    print("\n".join(lines))
    print(f"\n(threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


if __name__ == "__main__":
    main()
