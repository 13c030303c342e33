"""Wall time of ``fastadapt predict`` as a user runs it: 20-way 1-shot, 20 query images.

Each repetition starts fresh processes, interleaved: ``python -c pass`` (the interpreter),
``python -c "import torch"``, ``python -c "import fastadapt.cli"``, that plus ``torch._dynamo``
(which ``torch.func.grad`` imports on its first call) and the whole ``predict`` command on PNG
files. Medians, and the share of the command that is importing torch.

    python benchmarks/predict.py [--reps 5] [--hidden 64]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fastadapt import experiment
from fastadapt.checkpoint import save_checkpoint
from fastadapt.data import Glyphs


def make_files(folder: Path, ways: int) -> None:
    """One support and one query PNG per class, dark strokes on white (Omniglot-like files)."""
    glyphs = Glyphs(num_classes=ways, examples_per_class=2, split="test")
    for c in range(ways):
        for e, part in enumerate(("support", "query")):
            target = folder / part / (f"class{c:02d}" if part == "support" else "") / f"{c:02d}_{e}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - glyphs.images[2 * c + e, 0].numpy()).save(target)


def make_checkpoint(path: Path, ways: int, hidden: int) -> None:
    """A 20-way conv4 MAML model's checkpoint (untrained weights time the same as trained ones)."""
    config = experiment.resolve(dict(dataset="glyphs", n_way=ways, hidden=hidden, inner_steps_test=5))
    learner = experiment.build_learner(config)
    save_checkpoint({"model": learner.state_dict(), "config": config.to_dict(), "step": 0,
                     "transform": Glyphs.default_transform(config.data.image_size).to_dict(),
                     "class_names": None}, path)


def wall(command) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_files(folder, args.ways)
        make_checkpoint(folder / "model.pt", args.ways, args.hidden)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import torch": [sys.executable, "-c", "import torch"],
            "import fastadapt.cli": [sys.executable, "-c", "import fastadapt.cli"],
            # torch.func.grad's first call imports torch._dynamo (its autograd wrapper refers to it)
            "+ import torch._dynamo": [sys.executable, "-c", "import fastadapt.cli, torch._dynamo"],
            "fastadapt predict": [sys.executable, "-m", "fastadapt", "predict", str(folder / "model.pt"),
                                  "--support", str(folder / "support"), "--query", str(folder / "query")],
        }
        times = {name: [] for name in commands}
        wall(commands["fastadapt predict"])  # warm the file cache
        for _ in range(args.reps):
            for name, command in commands.items():
                times[name].append(wall(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    total = median["fastadapt predict"]
    print(f"fastadapt predict, {args.ways}-way 1-shot, {args.ways} queries, conv4-{args.hidden}, 5 steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} fresh processes")
    print(f"{'phase':<24s} {'seconds':>8s} {'share':>7s}")
    for name in commands:
        print(f"{name:<24s} {median[name]:8.3f} {100 * median[name] / total:6.1f}%")
    work = total - median["+ import torch._dynamo"]
    print(f"{'read, adapt, predict':<24s} {work:8.3f} {100 * work / total:6.1f}%  (predict minus all imports)")


if __name__ == "__main__":
    main()
