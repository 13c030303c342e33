"""The ``fastadapt`` command line: ``train``, ``eval``, ``predict`` and ``plot``. It only wires."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import warnings
import sys
import time
from pathlib import Path

import torch

from . import algorithms, distributed, experiment, models
from .checkpoint import RunLock, find_checkpoint, load_checkpoint
from .config import DATASETS, FLAT_KEYS, ConfigError, RunConfig
from .evaluate import evaluate

PRESET_HELP = ("MAML paper settings (Finn, Abbeel and Levine, ICML 2017, sec. 5 and app. A.1): "
               + ", ".join(name for name in experiment.PRESETS if "minimal" not in name)
               + "; omniglot-minimal-20w1s: the best recipe found for Lake's one-shot protocol trained on "
                 "images_background_small1 alone (docs/results.md)")


BN_STATISTICS_HELP = ("batch: normalise with each batch's statistics (transductive, default); running: with "
                      "the per-step statistics of a --per-step-bn run, so each image is classified alone")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of a run; defaults are None so that explicit values override a preset."""
    add = p.add_argument
    add("--preset", choices=sorted(experiment.PRESETS), help=PRESET_HELP)
    add("--dataset", choices=DATASETS, help="default glyphs: synthetic, generated offline")
    add("--root", help="folder of the data set (omniglot: the zips or folders; folder: DIR/train, DIR/val)")
    add("--download", action="store_true", default=None, help="fetch Omniglot's official zips (verified)")
    add("--algo", choices=sorted(algorithms.registered()),
        help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(algorithms.registered().items())))
    add("--n-way", "--n_way", dest="n_way", type=int)
    add("--k-shot", "--k-spt", "--k_spt", dest="k_shot", type=int)
    add("--k-query", "--k-qry", "--k_qry", dest="k_query", type=int)
    add("--task-batch", "--task-num", "--task_num", dest="task_batch", type=int, help="tasks per meta-batch")
    add("--inner-steps", "--update-step", "--update_step", dest="inner_steps", type=int)
    add("--inner-steps-test", "--update-step-test", "--update_step_test", dest="inner_steps_test", type=int)
    add("--inner-lr", "--update-lr", "--update_lr", dest="inner_lr", type=float)
    add("--meta-lr", "--meta_lr", dest="meta_lr", type=float)
    _add_algorithm_options(p)
    add("--steps", "--epoch", dest="meta_steps", type=int,
        help="meta-iterations (with --resume: extend the run to N)")
    add("--eval-every", type=int, help="validate (and save last.pt, best.pt) every N meta-iterations")
    add("--log-every", type=int, help="write per-step accuracy to metrics.jsonl every N meta-iterations")
    add("--checkpoint-every", type=float, metavar="SECONDS",
        help="also save last.pt every SECONDS of training (0: after every meta-iteration)")
    add("--time-limit", type=float, metavar="SECONDS",
        help="stop cleanly after SECONDS of training in this session, saving last.pt (resume to go on)")
    add("--budget", type=float, metavar="SECONDS",
        help="end the run after SECONDS of meta-iterations (validation excluded, resumes included) as if "
             "--steps were reached; --cosine then anneals over whichever ends first")
    add("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    add("--val-episodes", type=int, help="validation tasks")
    add("--test-episodes", type=int, help="test tasks evaluated at the end")
    add("--seed", type=int)
    add("--first-order", action="store_true", default=None)
    add("--device")
    add("--imgsz", "--image-size", dest="image_size", type=int)
    add("--imgc", "--channels", dest="channels", type=int)
    add("--hidden", type=int, help="conv4 filters")
    add("--network", help="a JSON file with a MAML-Pytorch config list ([[\"conv2d\", [64, 1, 3, 3, 2, 0]], ...]) "
                          "to train instead of conv4, initialised as that code does")
    add("--cosine", action="store_true", default=None, help="cosine annealing of the meta learning rate")
    add("--clip-grad", type=float, help="clip the meta-gradient norm")
    add("--train-split")
    add("--val-split")
    add("--test-split")
    add("--train-alphabets", help="comma-separated Omniglot alphabets")
    add("--val-alphabets")
    add("--test-alphabets")
    add("--rotations", action="store_true", default=None, help="Omniglot: rotated characters as new classes")
    add("--augment", action="store_true", default=None,
        help="random shifts (up to 10%%), zoom (0.9-1.1) and rotations (up to 10 degrees) of training images")
    add("--group-by", choices=["alphabet"], help="training episodes: all classes of a task from one alphabet")
    add("--protocol", choices=["maml", "official"], help="Omniglot: 'maml' = 1200/423 character split")
    add("--glyph-classes", type=int)
    add("--dtype", choices=["float32", "float64"])
    add("--task-chunk", type=_task_chunk, help="tasks vmapped together: auto (by device), all, or a number")
    add("--compile", action="store_true", default=None, help="torch.compile the meta-step (CPU; slow to start)")


def _task_chunk(text: str):
    if text in ("auto", "all"):
        return "auto" if text == "auto" else None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a number, got {text!r}") from None


def _add_algorithm_options(p: argparse.ArgumentParser) -> None:
    """The flags of every registered algorithm's own options (an option several declare is added once)."""
    seen = set()
    for cls in algorithms.registered().values():
        for option in cls.options:
            if option.name in seen:
                continue
            seen.add(option.name)
            flag = "--" + option.name.replace("_", "-")
            if option.type is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=option.help)
            else:
                p.add_argument(flag, type=option.type, default=None, choices=option.choices or None, help=option.help)


def _run_keys() -> set:
    return set(FLAT_KEYS) | experiment.option_names()


def _explicit(args) -> dict:
    """The run options given on the command line (argparse's defaults are None)."""
    return {k: v for k, v in vars(args).items() if k in _run_keys() and v is not None}


def _config_from(args) -> RunConfig:
    explicit = _explicit(args)
    if explicit.get("network") is not None:
        explicit["network"] = models.load_network_config(explicit["network"])
    preset = experiment.PRESETS.get(args.preset, {}) if args.preset else {}
    return experiment.resolve({**preset, **explicit})


def train_config(argv) -> RunConfig:
    """The checked ``RunConfig`` that ``fastadapt train ARGV`` would run (benchmarks build runs so)."""
    return _config_from(build_parser().parse_args(["train", *argv]))


# What --resume may change; everything else about a run is fixed when it starts.
RESUME_OVERRIDES = ("meta_steps", "device", "threads", "eval_every", "log_every", "checkpoint_every", "time_limit",
                    "budget")


def _resume_config(args, flags):
    """The stored configuration with the overrides --resume allows; the others are refused."""
    state = load_checkpoint(args.resume)
    explicit = _explicit(args)
    refused = [flags.get(k, k) for k in sorted(set(explicit) - set(RESUME_OVERRIDES))]
    refused += ["--preset"] if args.preset else []
    if refused:
        allowed = ", ".join(flags[k] for k in RESUME_OVERRIDES)
        raise ValueError(f"--resume continues a run as it was configured, so {', '.join(refused)} cannot be given "
                         f"(with --resume you may give {allowed})")
    if "meta_steps" in explicit and explicit["meta_steps"] < state["step"]:
        raise ValueError(f"--steps {explicit['meta_steps']}: the run is already at step {state['step']}")
    config = experiment.resolve(experiment.stored_config(state["config"]).updated(explicit))
    return config, args.out or (Path(args.resume).parent if Path(args.resume).is_file() else args.resume)


def _warn_if_busy() -> None:
    """torch's threads wait on each other at every small parallel region; on a machine whose cores
    other processes already use, that costs whole scheduler slices (benchmarks/meta_step.py
    --contention 2: 2.5-3.0 s per second-order iteration of 8 tasks with 2 threads, 1.2 s with 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    threads = torch.get_num_threads()
    if threads > 1 and load >= 1.0 and cores - load < threads:
        warnings.warn(f"the machine is busy (load average {load:.1f} on {cores} cores) and torch uses {threads} "
                      "threads, which then wait on each other; --threads 1 (or fewer) is often several times "
                      "faster here", stacklevel=2)


def _default_run_folder(config: RunConfig) -> str:
    """runs/<data>-<task>-<time>-<pid>: two runs started in the same second differ by process."""
    d = config.data
    task = f"k{d.k_shot}" if d.dataset == "sinusoid" else f"{d.n_way}w{d.k_shot}s"
    return f"runs/{d.dataset}-{task}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def cmd_train(args) -> int:
    if args.resume:
        config, out = _resume_config(args, args.flags)
    else:
        config = _config_from(args)
        out = args.out or _default_run_folder(config)
    out = Path(out)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    ctx = distributed.init(config.training.device)
    config.training.device = distributed.device_for(config.training.device)
    with RunLock(out) if ctx.is_main else contextlib.nullcontext():
        return _train(args, config, out, ctx)


def _train(args, config, out: Path, ctx) -> int:
    from .train import Stopped, Trainer, TrainingDiverged, stop_on_signals

    torch.manual_seed(config.training.seed)
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
        trainer.truncate_metrics()  # a --steps that extends the run stretches the cosine over it all
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main and config.training.device == "cpu" and not config.training.threads:
        _warn_if_busy()
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    workers = f", {ctx.world_size} processes" if ctx.enabled else ""
    d = config.data
    task = f"regression, K={d.k_shot}" if d.dataset == "sinusoid" else f"{d.n_way}-way {d.k_shot}-shot"
    say(f"run folder {out}  ({d.dataset}, {config.algorithm.name}, {task}{workers})")
    start = time.perf_counter()
    progress = not args.quiet and ctx.is_main
    with stop_on_signals(trainer):
        try:
            trainer.fit(progress=not args.quiet)
            seconds = time.perf_counter() - start
            report, result, final = _final_test(trainer, sources["test"], config, progress)
        except Stopped as stop:
            say(f"stopped ({stop.reason}) at step {trainer.step}; continue with: fastadapt train --resume {out}",
                file=sys.stderr)
            distributed.shutdown()
            return stop.exit_code
        except KeyboardInterrupt:
            say(f"interrupted at step {trainer.step}; continue with: fastadapt train --resume {out}", file=sys.stderr)
            return 130
        except TrainingDiverged as error:
            print(f"fastadapt train: diverged: {error}", file=sys.stderr)
            return 1
    if ctx.is_main:
        timing = {"train_seconds": seconds, "meta_iteration_seconds": trainer.step_seconds / max(1, trainer.steps_run)}
        (out / "test.json").write_text(json.dumps({**report, **timing}, indent=2))
    resumed = f", {trainer.steps_run} in this session" if args.resume else ""
    say(f"trained to step {trainer.step}{resumed} in {seconds:.0f} s; test of {report['checkpoint']} "
        f"(step {report['step']}):")
    say(result.table())
    if "final" in report:
        say(f"final weights (last.pt, step {trainer.step}): {_final_summary(final)}")
    distributed.shutdown()
    return 0


def _final_test(trainer, tasks, config, progress: bool):
    """Score the validation-selected weights (best.pt) on the test tasks, and the final ones
    beside them when they differ. A stop asked for meanwhile raises ``Stopped``: the test is
    run again on resume."""
    from .train import Stopped

    learner = trainer.learner
    should_stop = None if trainer.dist.enabled else (lambda: trainer.stop_request is not None)

    def test(desc):
        result = evaluate(learner, tasks, config.algorithm.inner_steps_test, device=config.training.device,
                          progress=progress,
                          desc=desc, should_stop=should_stop)
        if result is None:
            raise Stopped(*trainer.stop_request)
        return result

    final = test("test (last.pt)")
    report = {"checkpoint": "last.pt", "step": trainer.step, **final.as_dict()}
    result = final
    if trainer.best_model is not None:
        report.update(checkpoint="best.pt", step=trainer.best_step)
        if trainer.best_step != trainer.step:
            learner.load_state_dict(trainer.best_model)
            result = test("test (best.pt)")
            report = {"checkpoint": "best.pt", "step": trainer.best_step, **result.as_dict(),
                      "final": {"checkpoint": "last.pt", "step": trainer.step, **final.as_dict()}}
    return report, result, final


def _final_summary(result) -> str:
    if result.accuracy is not None:
        return f"{100 * result.accuracy[-1]:.2f}% ± {100 * result.accuracy_ci[-1]:.2f} after the last step"
    return f"loss {result.loss[-1]:.4f} ± {result.loss_ci[-1]:.4f} after the last step"


def cmd_eval(args) -> int:
    path = find_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    stored = experiment.stored_config(state["config"])
    # a run trained on a GPU is evaluated on the CPU where there is none, unless --device says otherwise
    changes = dict(dataset=args.dataset, root=args.root, test_split=args.split, test_alphabets=args.alphabets,
                   test_episodes=args.episodes, threads=args.threads,
                   device=args.device or experiment.usable_device(stored.training.device))
    config = experiment.resolve(experiment.with_bn_statistics(stored.updated(changes), args.bn_statistics))
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    steps = args.inner_steps_test if args.inner_steps_test is not None else config.algorithm.inner_steps_test
    if steps < 0:
        raise ValueError(f"--inner-steps-test must be a non-negative integer, got {steps}")
    learner = _load_learner(config, state, path)
    if args.protocol == "lake":
        if config.algorithm.name == "protonet":
            learner.n_way = 20
        elif config.data.n_way != 20:
            raise ValueError(f"--protocol lake is 20-way; {path} is a {config.data.n_way}-way model "
                             "(its output layer has that many units; a protonet run takes any number)")
        tasks, tested, left_out = experiment.lake_tasks(config, args.split or "background_small2", args.alphabets,
                                                        config.data.test_episodes)
        print("Lake et al.'s protocol: 20-way 1-shot within one alphabet, support and queries by different drawers")
        print(f"alphabets: {', '.join(tested)}" + (f" (left out, seen in training: {', '.join(left_out)})"
                                                   if left_out else ""))
    else:
        tasks = experiment.build_data(config, splits=("test",))["test"]
    print(f"{path} (step {state.get('step', '?')}):")
    print(evaluate(learner, tasks, steps, device=config.training.device, progress=not args.quiet,
                   desc="evaluate").table())
    return 0


def _load_learner(config, state, path):
    """The run's learner with the checkpoint's weights; errors say what the file is and what was expected."""
    bad = [name for name, value in state["model"].items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{path}: weights {bad[0]!r} (and {len(bad) - 1} more) are not finite; this checkpoint "
                         "cannot be evaluated")
    learner = experiment.build_learner(config)
    try:
        learner.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the model its config describes "
                         f"({str(error).splitlines()[-1].strip()})") from error
    return learner


def cmd_predict(args) -> int:
    from .predict import Predictor

    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    predictor = Predictor.load(args.checkpoint, device=args.device or "cpu", inner_steps=args.inner_steps_test,
                               bn_statistics=args.bn_statistics, invert=args.invert)
    query = Path(args.query)
    if not query.exists():
        raise FileNotFoundError(f"--query {query} does not exist")
    prediction = predictor.adapt(args.support).predict(query)
    k = args.top_k or 1
    ranked = prediction.top_k(k)
    if args.format == "json":
        rows = [{"path": source, "label": name, "probability": ranked[i][0][1],
                 **({"top_k": [{"label": n, "probability": p} for n, p in ranked[i]]} if args.top_k else {})}
                for i, (source, name) in enumerate(zip(prediction.sources, prediction.names))]
        print(json.dumps(rows, indent=2))
        return 0
    writer = csv.writer(sys.stdout, lineterminator="\n")
    header = ["path", "label", "probability"]
    for rank in range(2, len(ranked[0]) + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    writer.writerow(header)
    for source, name, top in zip(prediction.sources, prediction.names, ranked):
        row = [source, name, f"{top[0][1]:.6f}"]
        for other, probability in top[1:]:
            row += [other, f"{probability:.6f}"]
        writer.writerow(row)
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


class _Parser(argparse.ArgumentParser):
    """argparse with its command-line errors in one line (and exit status 2)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each run option's default (the configuration dataclasses') to its help; the parser's
    own defaults are None so that presets and stored configurations are not overridden."""
    defaults = RunConfig().flat()

    def shown(dest, default):
        if default is None:
            return "depends on --dataset" if dest in ("image_size", "channels", "hidden") else "off"
        if isinstance(default, bool):
            return "on" if default else "off"
        return default

    for action in parser._actions:
        if action.dest in defaults and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {shown(action.dest, defaults[action.dest])})".strip()


def _flags(parser: argparse.ArgumentParser) -> dict:
    """Configuration key -> the flag that sets it, over every subcommand (for error messages)."""
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for key, flag in _flags(sub).items():
                    flags.setdefault(key, flag)
        elif action.option_strings:
            flags.setdefault(action.dest, action.option_strings[0])
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastadapt", description="Fast gradient-based meta-learning.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="meta-train (default: MAML, 5-way 1-shot on synthetic Glyphs)",
                           description=PRESET_HELP)
    _add_run_options(train)
    train.add_argument("--out", help="run folder (default runs/<dataset>-<ways>w<shots>s-<time>-<pid>)")
    train.add_argument("--resume", help="continue the run in this folder or checkpoint (may change only --steps, "
                                        "--device, --threads, --eval-every, --log-every, --checkpoint-every, "
                                        "--time-limit)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    train.set_defaults(run=cmd_train)
    _show_defaults(train)

    ev = sub.add_parser("eval", help="evaluate a run on fixed test tasks with 95%% intervals")
    ev.add_argument("checkpoint", help="checkpoint file, or run folder (its best.pt, else last.pt)")
    ev.add_argument("--episodes", type=int, help="test tasks (default: the run's, 600)")
    ev.add_argument("--inner-steps-test", type=int)
    ev.add_argument("--dataset", choices=DATASETS)
    ev.add_argument("--root")
    ev.add_argument("--split", help="test split to evaluate on (with --protocol lake: default background_small2)")
    ev.add_argument("--protocol", choices=["lake"],
                    help="lake: Lake et al.'s within-alphabet 20-way 1-shot runs, support and queries by "
                         "different drawers (Omniglot)")
    ev.add_argument("--alphabets", help="comma-separated Omniglot alphabets")
    ev.add_argument("--device", help="default: the run's device if this machine has it, else cpu")
    ev.add_argument("--threads", type=int, help="torch CPU threads")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--bn-statistics", choices=["batch", "running"], help=BN_STATISTICS_HELP)
    ev.set_defaults(run=cmd_eval)

    pr = sub.add_parser("predict", help="adapt to a support folder and classify query images",
                        description="Adapt a meta-trained model to labelled support images and classify query "
                                    "images. Files are read with the preprocessing stored in the checkpoint.")
    pr.add_argument("checkpoint", help="checkpoint file, or run folder (its best.pt, else last.pt)")
    pr.add_argument("--support", required=True, help="DIR/<class>/<images>, one folder per class (any number "
                                                     "of images each)")
    pr.add_argument("--query", required=True, help="an image, or a folder of images to classify (normalised "
                                                   "together: see --bn-statistics)")
    pr.add_argument("--inner-steps-test", "--steps", dest="inner_steps_test", type=int,
                    help="adaptation steps (default: the run's test steps)")
    pr.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (csv has a header)")
    pr.add_argument("--top-k", type=int, help="also list the K most probable classes with probabilities")
    pr.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                    help="override the stored polarity: --invert reads files as 255 - pixel (Omniglot's "
                         "black-on-white PNGs), --no-invert as they are")
    pr.add_argument("--device", help="default cpu")
    pr.add_argument("--bn-statistics", choices=["batch", "running"], help=BN_STATISTICS_HELP)
    pr.set_defaults(run=cmd_predict)

    pl = sub.add_parser("plot", help="learning curves and accuracy per inner step, as PNG")
    pl.add_argument("run_dir")
    pl.set_defaults(run=cmd_plot)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
    except SystemExit as done:  # --help, or a malformed command line (already reported in one line)
        return int(done.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    args.flags = _flags(parser)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"fastadapt {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.run(args)
        except ConfigError as error:
            if debug:
                raise
            print(f"fastadapt {args.command}: error: {args.flags.get(error.key, error.key)} {error.message}",
                  file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as error:
            if debug:
                raise
            print(f"fastadapt {args.command}: error: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
