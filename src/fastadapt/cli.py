"""The ``fastadapt`` command line: ``train``, ``eval``, ``predict`` and ``plot``. It only wires."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import distributed, experiment
from .checkpoint import load_checkpoint
from .evaluate import evaluate

PRESET_HELP = ("MAML paper settings (Finn, Abbeel and Levine, ICML 2017, sec. 5 and app. A.1): "
               + ", ".join(experiment.PRESETS))


BN_STATISTICS_HELP = ("batch: normalise with each batch's statistics (transductive, default); running: with "
                      "the per-step statistics of a --per-step-bn run, so each image is classified alone")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of a run; defaults are None so that explicit values override a preset."""
    add = p.add_argument
    add("--preset", choices=sorted(experiment.PRESETS), help=PRESET_HELP)
    add("--dataset", choices=experiment.DATASETS, help="default glyphs: synthetic, generated offline")
    add("--root", help="folder of the data set (omniglot: the zips or folders; folder: DIR/train, DIR/val)")
    add("--download", action="store_true", default=None, help="fetch Omniglot's official zips (verified)")
    add("--algo", choices=sorted(experiment.ALGORITHMS))
    add("--n-way", type=int)
    add("--k-shot", "--k-spt", dest="k_shot", type=int)
    add("--k-query", "--k-qry", dest="k_query", type=int)
    add("--task-batch", "--task-num", dest="task_batch", type=int, help="tasks per meta-batch")
    add("--inner-steps", "--update-step", dest="inner_steps", type=int)
    add("--inner-steps-test", "--update-step-test", dest="inner_steps_test", type=int)
    add("--inner-lr", "--update-lr", dest="inner_lr", type=float)
    add("--meta-lr", type=float)
    add("--outer-lr", type=float, help="Reptile's outer step size (default 1.0)")
    add("--multi-step-loss", type=int, help="MAML++: anneal per-step query-loss weights over N iterations")
    add("--lslr", action="store_true", default=None, help="MAML++: learned per-layer per-step inner rates")
    add("--first-order-until", type=int, help="MAML++: first order for the first N meta-iterations")
    add("--per-step-bn", action="store_true", default=None,
        help="MAML++: per-step BatchNorm weights and running statistics")
    add("--bn-statistics", choices=["batch", "running"],
        help="BatchNorm: each batch's own statistics (default) or per-step running ones (needs --per-step-bn)")
    add("--steps", "--epoch", dest="steps", type=int, help="meta-iterations")
    add("--eval-every", type=int)
    add("--log-every", type=int)
    add("--val-episodes", type=int, help="validation tasks")
    add("--test-episodes", type=int, help="test tasks evaluated at the end")
    add("--seed", type=int)
    add("--first-order", action="store_true", default=None)
    add("--device")
    add("--imgsz", "--image-size", dest="image_size", type=int)
    add("--imgc", "--channels", dest="channels", type=int)
    add("--hidden", type=int, help="conv4 filters")
    add("--cosine", action="store_true", default=None, help="cosine annealing of the meta learning rate")
    add("--clip-grad", type=float, help="clip the meta-gradient norm")
    add("--train-split")
    add("--val-split")
    add("--test-split")
    add("--train-alphabets", help="comma-separated Omniglot alphabets")
    add("--val-alphabets")
    add("--test-alphabets")
    add("--rotations", action="store_true", default=None, help="Omniglot: rotated characters as new classes")
    add("--protocol", choices=["maml", "official"], help="Omniglot: 'maml' = 1200/423 character split")
    add("--glyph-classes", type=int)
    add("--dtype", choices=["float32", "float64"])


def _config_from(args) -> dict:
    keys = set(experiment.DEFAULTS)
    explicit = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    preset = experiment.PRESETS.get(args.preset, {}) if args.preset else {}
    return experiment.resolve({**preset, **explicit})


def cmd_train(args) -> int:
    from .train import Trainer

    if args.resume:
        state = load_checkpoint(args.resume)
        config = state["config"]
        out = Path(args.out or (Path(args.resume).parent if Path(args.resume).is_file() else args.resume))
    else:
        config = _config_from(args)
        out = Path(args.out or f"runs/{config['dataset']}-{config['n_way']}w{config['k_shot']}s-{time.strftime('%Y%m%d-%H%M%S')}")
    ctx = distributed.init(config["device"])
    config = dict(config, device=distributed.device_for(config["device"]))
    torch.manual_seed(config["seed"])
    learner = experiment.build_learner(config)
    sources = experiment.build_data(config)
    writer = None
    if args.tensorboard and ctx.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'fastadapt[tensorboard]'") from error
        writer = SummaryWriter(str(out / "tensorboard"))
    trainer = Trainer(learner, sources["train"], config, out, sources["val"], ctx, writer=writer)
    if args.resume:
        trainer.resume(args.resume)
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    workers = f", {ctx.world_size} processes" if ctx.enabled else ""
    say(f"run folder {out}  ({config['dataset']}, {config['algo']}, {config['n_way']}-way {config['k_shot']}-shot{workers})")
    start = time.perf_counter()
    try:
        trainer.fit(progress=not args.quiet)
    except KeyboardInterrupt:
        say(f"stopped; continue with: fastadapt train --resume {out}", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    result = evaluate(learner, sources["test"], config["inner_steps_test"], device=config["device"])
    if ctx.is_main:
        timing = {"train_seconds": seconds, "meta_iteration_seconds": trainer.step_seconds / max(1, trainer.steps_run)}
        (out / "test.json").write_text(json.dumps({**result.as_dict(), **timing}, indent=2))
    say(f"trained {config['steps']} steps in {seconds:.0f} s; test:")
    say(result.table())
    distributed.shutdown()
    return 0


def cmd_eval(args) -> int:
    state = load_checkpoint(args.checkpoint)
    config = dict(state["config"])
    for key in ("dataset", "root"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.split is not None:
        config["test_split"] = args.split
    if args.alphabets is not None:
        config["test_alphabets"] = args.alphabets
    if args.episodes is not None:
        config["test_episodes"] = args.episodes
    config["device"] = args.device or config["device"]
    if args.bn_statistics is not None:
        config["bn_statistics"] = args.bn_statistics
    config = experiment.resolve(config)
    learner = experiment.build_learner(config)
    learner.load_state_dict(state["model"])
    steps = args.inner_steps_test if args.inner_steps_test is not None else config["inner_steps_test"]
    tasks = experiment.build_data(config, splits=("test",))["test"]
    print(evaluate(learner, tasks, steps, device=config["device"]).table())
    return 0


def cmd_predict(args) -> int:
    from .data import ImageFolder
    from .data.imageset import load_images

    state = load_checkpoint(args.checkpoint)
    config = dict(state["config"], device="cpu")
    if args.bn_statistics is not None:
        config["bn_statistics"] = args.bn_statistics
    config = experiment.resolve(config)
    if config["dataset"] == "sinusoid":
        raise ValueError("predict works with image classifiers; this checkpoint is a sinusoid regressor")
    support = ImageFolder(args.support, config["image_size"], config["channels"], strict_channels=True)
    if support.num_classes != config["n_way"]:
        raise ValueError(f"--support {args.support}: {support.num_classes} class folders, but the model is "
                         f"{config['n_way']}-way")
    query_root = Path(args.query)
    if not query_root.is_dir():
        raise FileNotFoundError(f"--query {query_root} is not a folder")
    files = sorted(p for p in query_root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--query {query_root} holds no files")
    images, _ = load_images([(str(p), p.read_bytes) for p in files], config["image_size"], config["channels"],
                            strict_channels=True)
    learner = experiment.build_learner(config)
    learner.load_state_dict(state["model"])
    steps = args.steps if args.steps is not None else config["inner_steps_test"]
    fast = learner.adapt(support.images.float() / 255, support.targets, steps=steps)
    with torch.no_grad():
        predicted = learner.predict(fast, torch.from_numpy(images).float() / 255).argmax(-1)
    for path, label in zip(files, predicted.tolist()):
        print(f"{path},{support.class_names[label]}")
    return 0


def cmd_plot(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description="Fast gradient-based meta-learning.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="meta-train (default: MAML, 5-way 1-shot on synthetic Glyphs)",
                           description=PRESET_HELP)
    _add_run_options(train)
    train.add_argument("--out", help="run folder (default runs/<dataset>-<ways>w<shots>s-<time>)")
    train.add_argument("--resume", help="continue the run in this folder or checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    train.set_defaults(run=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run on fixed test tasks with 95%% intervals")
    ev.add_argument("checkpoint", help="run folder or checkpoint file")
    ev.add_argument("--episodes", type=int, help="test tasks (default: the run's, 600)")
    ev.add_argument("--inner-steps-test", type=int)
    ev.add_argument("--dataset", choices=experiment.DATASETS)
    ev.add_argument("--root")
    ev.add_argument("--split", help="test split to evaluate on")
    ev.add_argument("--alphabets", help="comma-separated Omniglot alphabets")
    ev.add_argument("--device")
    ev.add_argument("--bn-statistics", choices=["batch", "running"], help=BN_STATISTICS_HELP)
    ev.set_defaults(run=cmd_eval)

    pr = sub.add_parser("predict", help="adapt to a support folder and classify query images")
    pr.add_argument("checkpoint")
    pr.add_argument("--support", required=True, help="DIR/<class>/<images>, one folder per class")
    pr.add_argument("--query", required=True, help="folder of images to classify")
    pr.add_argument("--steps", type=int, help="adaptation steps (default: the run's test steps)")
    pr.add_argument("--bn-statistics", choices=["batch", "running"], help=BN_STATISTICS_HELP)
    pr.set_defaults(run=cmd_predict)

    pl = sub.add_parser("plot", help="learning curves and accuracy per inner step, as PNG")
    pl.add_argument("run_dir")
    pl.set_defaults(run=cmd_plot)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv or ["train"])
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as error:
        print(f"fastadapt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
