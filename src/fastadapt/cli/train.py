"""``fastadapt train``: meta-train a new run, or continue one with ``--resume``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import data, distributed, experiment
from ..checkpoint import RunLock, write_text
from . import common


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-train (default: MAML, 5-way 1-shot on synthetic Glyphs)",
                       description=common.preset_help())
    common.add_run_options(p)
    g = next(group for group in p._action_groups if group.title == "checkpoints and stopping")
    g.add_argument("--out", help="run folder (default runs/<dataset>-<ways>w<shots>s-<time>-<pid>)")
    g.add_argument("--resume", help="continue the run in this folder or checkpoint; it may change only "
                                    + ", ".join(_flag(key) for key in common.RESUME_OVERRIDES))
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such a folder is refused)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    p.set_defaults(run=run)
    common.show_defaults(p)


def _flag(key: str) -> str:
    return {"meta_steps": "--steps"}.get(key, "--" + key.replace("_", "-"))


def train_config(argv):
    """The checked ``RunConfig`` that ``fastadapt train ARGV`` would run (benchmarks build runs so)."""
    from . import build_parser
    return common.config_from(build_parser().parse_args(["train", *argv]))


def _resume_config(args, flags):
    """The stored configuration with the overrides --resume allows; the others are refused."""
    given = common.explicit(args)
    refused = [flags.get(k, k) for k in sorted(set(given) - set(common.RESUME_OVERRIDES))]
    refused += ["--preset"] if args.preset else []
    if refused:
        allowed = ", ".join(flags[k] for k in common.RESUME_OVERRIDES)
        raise ValueError(f"--resume continues a run as it was configured, so {', '.join(refused)} cannot be given "
                         f"(with --resume you may give {allowed})")
    loaded = experiment.load_run(Path(args.resume) / "last.pt" if Path(args.resume).is_dir() else args.resume,
                                 changes=given, build=False)
    if "meta_steps" in given and given["meta_steps"] < loaded.state["step"]:
        raise ValueError(f"--steps {given['meta_steps']}: the run is already at step {loaded.state['step']}")
    return loaded.config, args.out or (Path(args.resume).parent if Path(args.resume).is_file() else args.resume)


def _default_run_folder(config) -> str:
    """runs/<data>-<task>-<time>-<pid>: two runs started in the same second differ by process."""
    if config.rl.env is not None:
        name = f"{config.rl.env}-{config.data.task_batch}t{config.rl.trajectories}x"
    else:
        name = f"{config.data.dataset}-{data.source(config.data.dataset).tag(config)}"
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def run(args) -> int:
    if args.resume:
        config, out = _resume_config(args, args.flags)
    else:
        config = common.config_from(args)
        out = args.out or _default_run_folder(config)
        from ..train import already_a_run, run_files
        held = run_files(out)
        if held and not args.overwrite:
            raise FileExistsError(already_a_run(out, held, f"--resume {out}", "--overwrite"))
    out = Path(out)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    ctx = distributed.init(config.training.device)
    config.training.device = distributed.device_for(config.training.device)
    new_folder = not out.exists()
    try:
        with RunLock(out) if ctx.is_main else contextlib.nullcontext():
            code = _train(args, config, out, ctx)
    except Exception:
        if ctx.is_main and not args.resume:
            _remove_unfinished(out, new_folder)
        raise
    if code != 0 and ctx.is_main and not args.resume:  # e.g. diverged before its first checkpoint
        _remove_unfinished(out, new_folder)
    return code


# what a new run writes before its first checkpoint
_UNFINISHED_FILES = ("config.json", "metrics.jsonl", "test.json")


def _remove_unfinished(out: Path, new_folder: bool) -> None:
    """A new run that fails before its first checkpoint leaves nothing to resume: its files go,
    and the folder too if this run made it. A folder holding a checkpoint is left as it is."""
    if not out.is_dir() or any((out / name).is_file() for name in ("last.pt", "best.pt")):
        return
    with contextlib.suppress(OSError):
        for name in _UNFINISHED_FILES:
            (out / name).unlink(missing_ok=True)
        board = out / "tensorboard"
        if board.is_dir():
            import shutil
            shutil.rmtree(board)
        if new_folder and not any(out.iterdir()):
            out.rmdir()


def _train(args, config, out: Path, ctx) -> int:
    from ..train import Stopped, Trainer, TrainingDiverged, stop_on_signals

    torch.manual_seed(config.training.seed)
    sources = common.build_tasks(config)  # first: it may size the network's head (the training classes)
    learner = common.build_learner(config)
    if config.model.init is not None and not args.resume:
        say_main = print if ctx.is_main else (lambda *a, **k: None)
        say_main(experiment.load_init(learner, config.model.init))
    writer = None
    if args.tensorboard and ctx.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'fastadapt[tensorboard]'") from error
        writer = SummaryWriter(str(out / "tensorboard"))
    trainer = Trainer(learner, sources["train"], config, out, sources["val"], ctx, writer=writer,
                      overwrite=bool(getattr(args, "overwrite", False)))
    if args.resume:
        trainer.resume(args.resume)
        trainer.truncate_metrics()  # a --steps that extends the run stretches the cosine over it all
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main:
        write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    workers = f", {ctx.world_size} processes" if ctx.enabled else ""
    say(f"run folder {out}  ({common.describe(config)}{workers})")
    start = time.perf_counter()
    progress = not args.quiet and ctx.is_main
    with stop_on_signals(trainer):
        try:
            trainer.fit(progress=not args.quiet)
            seconds = time.perf_counter() - start
            report, result, final = trainer.test(sources["test"], progress)
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
    same = config.rl.env is None and data.source(config.data.dataset).test_is_validation(config)
    if same:  # said plainly: the warning scrolls away, test.json and the summary stay
        report["test_is_validation"] = True
    if ctx.is_main:
        timing = {"train_seconds": seconds, "meta_iteration_seconds": trainer.step_seconds / max(1, trainer.steps_run)}
        write_text(out / "test.json", json.dumps({**report, **timing}, indent=2))
    resumed = f", {trainer.steps_run} in this session" if args.resume else ""
    say(f"trained to step {trainer.step}{resumed} in {seconds:.0f} s; test of {report['checkpoint']} "
        f"(step {report['step']})" + (" on the validation classes (no test split of its own)" if same else "") + ":")
    say(result.table())
    if "final" in report:
        say(f"final weights (last.pt, step {trainer.step}): {_final_summary(final)}")
    distributed.shutdown()
    return 0


def _final_summary(result) -> str:
    if result.returns is not None:
        return f"return {result.returns[-1]:.2f} ± {result.returns_ci[-1]:.2f} after the last step"
    if result.accuracy is not None:
        return f"{100 * result.accuracy[-1]:.2f}% ± {100 * result.accuracy_ci[-1]:.2f} after the last step"
    return f"loss {result.loss[-1]:.4f} ± {result.loss_ci[-1]:.4f} after the last step"
