"""What the commands share: the parser class, the run options in groups, reading a run's
configuration from the command line, and the flags that name configuration fields in errors."""

from __future__ import annotations

import argparse
import sys

from .. import algorithms, data, experiment, models
from ..config import FLAT_KEYS, ConfigError, ModelConfig, RLConfig, RunConfig
from ..rl.envs import families as rl_families

BN_STATISTICS_HELP = ("batch: normalise with each batch's statistics (transductive, default); running: with "
                      "the per-step statistics of a --per-step-bn run, so each image is classified alone")

# What --resume may change; everything else about a run is fixed when it starts.
RESUME_OVERRIDES = ("meta_steps", "device", "threads", "eval_every", "log_every", "checkpoint_every", "time_limit",
                    "budget")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2), and every ``--flag-name`` also accepted as
    ``--flag_name`` (the MAML-Pytorch scripts' spelling), whatever the flag."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._dashed(a) for a in args], namespace)

    def _dashed(self, arg: str) -> str:
        if not arg.startswith("--") or "_" not in arg.partition("=")[0]:
            return arg
        flag, equals, value = arg.partition("=")
        dashed = flag.replace("_", "-")
        return dashed + equals + value if dashed in self._option_string_actions else arg


def task_chunk(text: str):
    if text in ("auto", "all"):
        return "auto" if text == "auto" else None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a number, got {text!r}") from None


class _Off:
    """A flag's value that unsets what a preset set (``--frame off``): not a string, so no other
    option's value can be taken for it."""

    def __repr__(self) -> str:
        return "off"


OFF = _Off()


def frame_fraction(text: str):
    """``--frame``: a number (``config.frame_fraction`` refuses one outside [0.1, 1]) or ``off``."""
    if text.lower() in ("off", "none"):
        return OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0.1 to 1 such as 0.8, or off, got {text!r}") from None


def widths(text: str):
    """``64,160,320,640`` -> a list of ints (``ModelConfig.check`` refuses the wrong count)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,160,320,640, got {text!r}")


def _add_options(group, options, seen: set) -> None:
    """Flags of declared ``Option``s (an option several declare is added once)."""
    for option in options:
        if option.name in seen:
            continue
        seen.add(option.name)
        flag = "--" + option.name.replace("_", "-")
        if option.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=option.help)
        else:
            group.add_argument(flag, type=option.type, default=None, choices=option.choices or None, help=option.help)


def preset_help() -> str:
    return ("MAML paper settings (Finn, Abbeel and Levine, ICML 2017, sec. 5 and app. A.1): "
            + ", ".join(name for name in experiment.PRESETS if "minimal" not in name)
            + "; omniglot-minimal-20w1s: the best recipe found for Lake's one-shot protocol trained on "
              "images_background_small1 alone (docs/results.md)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a run, grouped; defaults are None so that explicit values override a preset
    (and a stored configuration). Each data set's and algorithm's own options come from their
    declarations."""
    p.add_argument("--preset", choices=sorted(experiment.PRESETS), help=preset_help())
    seen: set = set()
    sources = data.sources()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(sources),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(sources.items())))
    g.add_argument("--root", help="folder of the data set (omniglot: the zips or folders; folder: DIR/train, DIR/val)")
    g.add_argument("--download", action="store_true", default=None, help="fetch Omniglot's official zips (verified)")
    g.add_argument("--train-split")
    g.add_argument("--val-split")
    g.add_argument("--test-split", help="(default: the validation split, with a warning)")
    g.add_argument("--augment", action="store_true", default=None,
                   help="random shifts (up to 10%%), zoom (0.9-1.1) and rotations (up to 10 degrees) of training images")
    g.add_argument("--augment-strokes", action="store_true", default=None,
                   help="handwriting: draw training characters as another hand might (random stroke width, "
                        "smooth local warps; docs/data.md)")
    g.add_argument("--group-by", choices=["alphabet"], help="training episodes: all classes of a task from one alphabet")
    g.add_argument("--drawers", choices=["disjoint"],
                   help="training episodes: each task's support images by k-shot drawers and its queries by "
                        "k-query other drawers, the same for every class, as Lake's protocol tests (Omniglot)")
    g.add_argument("--frame", type=frame_fraction, metavar="FRACTION",
                   help="drawings (omniglot, folder): crop each image to its ink and centre it, its longer side "
                        "FRACTION of the image (0.8 say), so a drawing's size and place on the page do not matter; "
                        "stored with the run, so predict reads files the same way; off: the whole page, as it is "
                        "(the omniglot-minimal-20w1s preset frames at 0.8)")
    g.add_argument("--image-size", "--imgsz", dest="image_size", type=int)
    g.add_argument("--channels", "--imgc", dest="channels", type=int)
    for cls in sources.values():
        _add_options(g, cls.options, seen)
    g = p.add_argument_group("episode shape")
    g.add_argument("--n-way", dest="n_way", type=int)
    g.add_argument("--k-shot", "--k-spt", dest="k_shot", type=int)
    g.add_argument("--k-query", "--k-qry", dest="k_query", type=int)
    g.add_argument("--task-batch", "--task-num", dest="task_batch", type=int, help="tasks per meta-batch")
    g.add_argument("--val-episodes", type=int, help="validation tasks")
    g.add_argument("--test-episodes", type=int, help="test tasks evaluated at the end")
    g = p.add_argument_group("algorithm")
    known = algorithms.registered()
    g.add_argument("--algo", choices=sorted(known),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(known.items())))
    g.add_argument("--inner-steps", "--update-step", dest="inner_steps", type=int)
    g.add_argument("--inner-steps-test", "--update-step-test", dest="inner_steps_test", type=int)
    g.add_argument("--inner-lr", "--update-lr", dest="inner_lr", type=float)
    g.add_argument("--first-order", action="store_true", default=None)
    g.add_argument("--query-statistics", choices=["batch", "support"],
                   help="BatchNorm on the query images: a task's queries normalised together (batch, the MAML "
                        "paper's), or each with its support set's statistics (support: trained as predict "
                        "classifies one image alone)")
    for cls in known.values():
        _add_options(g, cls.options, seen)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["conv4", "resnet12"], help="the network: conv4 (the MAML paper's) or "
                                                                      "ResNet-12 (MetaOptNet's)")
    g.add_argument("--hidden", type=int, help="conv4 filters")
    g.add_argument("--norm", choices=list(ModelConfig.NORMS),
                   help="conv4's normalisation: batch (BatchNorm) or tasknorm (TaskNorm-I, Bronskill et al. 2020: "
                        "statistics blended with each image's own; with --query-statistics support, a model that "
                        "classifies one image alone as it was trained to)")
    g.add_argument("--widths", type=widths, help="ResNet-12's four block widths, e.g. 64,160,320,640 (the default)")
    g.add_argument("--drop-block", type=float, help="ResNet-12: DropBlock probability in its last two blocks")
    g.add_argument("--network", help="a JSON file with a MAML-Pytorch config list ([[\"conv2d\", [64, 1, 3, 3, 2, 0]], "
                                     "...]) to train instead of conv4, initialised as that code does")
    g.add_argument("--dtype", choices=["float32", "float64"])
    g.add_argument("--init", metavar="RUN_OR_CHECKPOINT",
                   help="start the network's backbone (and its head, where the shapes agree) from a run folder, a "
                        "checkpoint or a state-dict file: meta-training from a pretrained start")
    g = p.add_argument_group("training")
    g.add_argument("--meta-lr", dest="meta_lr", type=float)
    g.add_argument("--steps", "--epoch", dest="meta_steps", type=int,
                   help="meta-iterations (with --resume: extend the run to N)")
    g.add_argument("--cosine", action="store_true", default=None, help="cosine annealing of the meta learning rate")
    g.add_argument("--clip-grad", type=float, help="clip the meta-gradient norm")
    g.add_argument("--seed", type=int)
    g.add_argument("--eval-every", type=int, help="validate (and save last.pt, best.pt) every N meta-iterations")
    g.add_argument("--log-every", type=int, help="write per-step accuracy to metrics.jsonl every N meta-iterations")
    g = p.add_argument_group("checkpoints and stopping")
    g.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="also save last.pt every SECONDS of training (0: after every meta-iteration)")
    g.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop cleanly after SECONDS of training in this session, saving last.pt (resume to go on)")
    g.add_argument("--budget", type=float, metavar="SECONDS",
                   help="end the run after SECONDS of meta-iterations (validation excluded, resumes included) as if "
                        "--steps were reached; --cosine then anneals over whichever ends first")
    g = p.add_argument_group("meta-RL (a task family in place of --dataset)")
    g.add_argument("--env", choices=sorted(rl_families()),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in sorted(rl_families().items()))
                        + ". --env NAME starts from the preset NAME")
    g.add_argument("--trajectories", type=int, help="trajectories per task, for the support and the query sets")
    g.add_argument("--horizon", type=int, help="steps per trajectory (default: the family's)")
    g.add_argument("--activation", choices=["relu", "tanh"], help="the policy's (its two hidden layers are --hidden wide)")
    g.add_argument("--gamma", type=float, help="discount")
    g.add_argument("--gae-lambda", type=float, help="GAE lambda (1: return minus the linear baseline)")
    g.add_argument("--outer", choices=["trpo", "ppo"], help="outer step: TRPO (the paper's) or clipped-surrogate Adam")
    g.add_argument("--max-kl", type=float, help="TRPO: largest mean KL of a step")
    g.add_argument("--cg-iters", type=int, help="TRPO: conjugate-gradient iterations")
    g.add_argument("--cg-damping", type=float, help="TRPO: damping added to the KL's Hessian")
    g.add_argument("--ls-steps", type=int, help="TRPO: line-search steps")
    g.add_argument("--ls-ratio", type=float, help="TRPO: line-search backtracking ratio")
    g.add_argument("--hvp-fraction", type=float,
                   help="TRPO: share of each task's trajectories the KL's curvature is taken on (1: all)")
    g.add_argument("--inner-estimator", choices=RLConfig.INNER_ESTIMATORS,
                   help="the inner policy-gradient loss: reinforce (the MAML paper's) or lvc (ProMP's low-variance "
                        "curvature: the same inner steps, a meta-gradient that credits the pre-update sampling)")
    g.add_argument("--workers", type=int, help="gymnasium environments: subprocesses (1: in this process)")
    g.add_argument("--val-tasks", type=int, help="fixed validation tasks")
    g.add_argument("--test-tasks", type=int, help="fixed test tasks evaluated at the end")
    g = p.add_argument_group("devices")
    g.add_argument("--device")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: chosen by timing the run's iterations, "
                                                   "re-chosen as the machine's load changes)")
    g.add_argument("--task-chunk", type=task_chunk, help="tasks vmapped together: auto (by device), all, or a number")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the meta-step (CPU; slow to start)")


def run_keys() -> set:
    """Every flat configuration key: the fields, and every data set's and algorithm's options."""
    options = {o.name for cls in data.sources().values() for o in cls.options}
    return set(FLAT_KEYS) | options | {o.name for cls in algorithms.registered().values() for o in cls.accepted_options()}


def explicit(args) -> dict:
    """The run options given on the command line (argparse's defaults are None)."""
    keys = run_keys()
    return {k: (None if v is OFF else v) for k, v in vars(args).items() if k in keys and v is not None}


def config_from(args) -> RunConfig:
    """The checked configuration of a new run: the preset, then the options given."""
    given = explicit(args)
    if given.get("network") is not None:
        given["network"] = models.load_network_config(given["network"])
    preset = experiment.PRESETS.get(args.preset or given.get("env"), {})
    chosen, flag_of = {**preset, **given}, getattr(args, "flags", {})
    if chosen.get("env") is not None:
        from ..rl import experiment as rl_experiment
        if chosen.get("dataset") is not None:
            source = "" if "dataset" in given else f" (from --preset {args.preset})"
            raise ConfigError("dataset", f"is {chosen['dataset']!r}{source} and --env is {chosen['env']!r}: a run's "
                                         "tasks come from a data set or from a task family, not both")
        ignored = rl_experiment.ignored_options()
        _warn_ignored(given, (("a meta-RL run", ignored),), flag_of)
        return rl_experiment.check(experiment.resolve({k: v for k, v in chosen.items() if k not in ignored}))
    config = experiment.resolve(chosen)
    _warn_ignored(given, ((config.algorithm.name, algorithms.registered()[config.algorithm.name].ignores),
                          (config.data.dataset, data.source(config.data.dataset).ignores)), flag_of)
    return config


def _warn_ignored(given: dict, owners, flag_of: dict) -> None:
    """One warning per option given on the command line that one of ``owners`` (``(name, {key:
    why})``: the algorithm, the data set, a meta-RL run) ignores."""
    import warnings
    for name, ignores in owners:
        for key in sorted(set(given) & set(ignores)):
            warnings.warn(f"{flag_of.get(key, '--' + key.replace('_', '-'))} means nothing for {name} "
                          f"({ignores[key]}); it is ignored", stacklevel=3)


def describe(config: RunConfig) -> str:
    """The run's data and task shape in words, for its first line."""
    if config.rl.env is not None:
        from ..rl import experiment as rl_experiment
        return f"{config.rl.env}, {config.algorithm.name}, {rl_experiment.describe(config)}"
    queries = ", queries normalised with the support set's statistics" \
        if config.algorithm.query_statistics == "support" else ""
    return (f"{config.data.dataset}, {config.algorithm.name}, {data.source(config.data.dataset).describe(config)}"
            f"{queries}")


def build_tasks(config: RunConfig, splits=("train", "val", "test")) -> dict:
    """A run's task sources: a meta-RL run's from ``rl``, else the experiment's."""
    if config.rl.env is not None:
        from ..rl import experiment as rl_experiment
        return rl_experiment.build_tasks(config, splits)
    return experiment.build_data(config, splits)


def build_learner(config: RunConfig):
    """A run's learner: a meta-RL run's from ``rl``, else the experiment's (also ``load_run``'s
    ``builder``)."""
    if config.rl.env is not None:
        from ..rl import experiment as rl_experiment
        return rl_experiment.build_learner(config)
    return experiment.build_learner(config)


def show_defaults(parser: argparse.ArgumentParser) -> None:
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


def flags(parser: argparse.ArgumentParser, command=None) -> dict:
    """Configuration key -> the flag that sets it (for error messages): ``command``'s own flags
    first, then those of the other subcommands."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            order = sorted(action.choices, key=lambda name: name != command)
            for name in order:
                for key, flag in flags(action.choices[name]).items():
                    found.setdefault(key, flag)
        elif action.option_strings:
            found.setdefault(action.dest, action.option_strings[0])
    return found
