"""``fastadapt eval``: score a run on fixed test tasks, or on one of its data set's protocols."""

from __future__ import annotations

import torch

from .. import data, experiment
from ..checkpoint import find_checkpoint
from ..data.augment import view_augmentation
from ..evaluate import Member, evaluate
from . import common


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run on fixed test tasks with 95%% intervals")
    p.add_argument("checkpoint", nargs="+",
                   help="checkpoint file, or run folder (its best.pt, else last.pt); several: an ensemble, each "
                        "query predicted by the mean class probabilities of every model (on the first one's tasks)")
    p.add_argument("--episodes", dest="test_episodes", type=int, help="test tasks (default: the run's: 600, or 40 "
                                                                        "for a meta-RL run)")
    p.add_argument("--inner-steps-test", type=int)
    p.add_argument("--head", choices=["centroid", "logistic", "cosine", "finetune"],
                   help="a pretrain run: score it with this head instead of the one it was trained with")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(data.sources()))
    g.add_argument("--root")
    g.add_argument("--split", help="test split to evaluate on (with --protocol lake: default background_small2)")
    protocols = {name: text for cls in data.sources().values() for name, text in cls.protocols.items()}
    g.add_argument("--protocol", choices=sorted(protocols) or None,
                   help="; ".join(f"{name}: {text}" for name, text in sorted(protocols.items())))
    g.add_argument("--alphabets", dest="test_alphabets", help="comma-separated Omniglot alphabets")
    g = p.add_argument_group("devices")
    g.add_argument("--device", help="default: the run's device if this machine has it, else cpu")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--tta", type=int, default=1, metavar="VIEWS",
                   help="test-time augmentation: each support image and VIEWS-1 augmented copies of it are the "
                        "support set, and each query is predicted by the mean probabilities of its VIEWS copies "
                        "(copies drawn as the run's training augmentation, or --augment's if it had none; "
                        "scored after the last step; default 1: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bn-statistics", choices=["batch", "running"], help=common.BN_STATISTICS_HELP)
    p.set_defaults(run=run)


def run(args) -> int:
    changes = dict(dataset=args.dataset, root=args.root, test_split=args.split, test_alphabets=args.test_alphabets,
                   test_episodes=args.test_episodes, test_tasks=args.test_episodes, threads=args.threads,
                   head=args.head)
    if args.tta < 1:
        raise ValueError(f"--tta must be a positive integer (views of each image; 1: none), got {args.tta}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # a run trained on a GPU is evaluated on the CPU where there is none, unless --device says otherwise
    first, *others = args.checkpoint
    data_flags = {"dataset": "--dataset", "root": "--root", "test_split": "--split", "test_alphabets": "--alphabets"}
    given = [flag for key, flag in data_flags.items() if changes[key] is not None]
    if given:  # a meta-RL run has no data set to change
        env = experiment.load_run(first, build=False).config.rl.env
        if env is not None:
            raise ValueError(f"{given[0]}: {first} is a meta-RL run ({env}), whose test tasks come from its task "
                             "family, not from a data set")
    run_changes = _changes_per_run(args.checkpoint, changes)
    loaded = experiment.load_run(first, changes=run_changes[first], device=args.device or "usable",
                                 bn_statistics=args.bn_statistics, builder=common.build_learner)
    config, learner = loaded.config, loaded.learner
    steps = args.inner_steps_test if args.inner_steps_test is not None else config.algorithm.inner_steps_test
    if steps < 0:
        raise ValueError(f"--inner-steps-test must be a non-negative integer, got {steps}")
    if args.inner_steps_test is not None and not getattr(learner, "takes_steps", True):
        import warnings
        warnings.warn(f"--inner-steps-test means nothing for this {config.algorithm.name} run (its adaptation has no "
                      "steps); it is ignored", stacklevel=2)
    if args.protocol:
        if config.rl.env is not None:
            raise ValueError(f"--protocol {args.protocol}: {loaded.path} is {_kind(config)}; protocols are image data "
                             "sets' (without --protocol, eval scores its own test tasks)")
        tasks, lines = experiment.protocol_tasks(config, args.protocol, args.split, args.test_alphabets,
                                                 config.data.test_episodes)
        try:
            learner.use_classes(tasks[0].support_y.shape[1])
        except ValueError as error:
            raise ValueError(f"--protocol {args.protocol}: {error}; {loaded.path} cannot be scored on it") from None
        print("\n".join(lines))
    else:
        tasks = common.build_tasks(config, splits=("test",))["test"]
    if (args.tta > 1 or others) and not getattr(learner, "classification", False):
        raise ValueError(f"{'--tta' if args.tta > 1 else 'an ensemble'}: needs a classification run (class "
                         f"probabilities); {loaded.path} is {_kind(config)}")
    view_augment = None
    if args.tta > 1:
        view_augment = view_augmentation(config.data.augment, config.data.augment_strokes)
        print(f"test-time augmentation: {args.tta} views of each image ({view_augment!r}), "
              f"scored after {steps if getattr(learner, 'takes_steps', True) else 0} steps")
    members = [ensemble_member(path, tasks[0], loaded, run_changes[path], args) for path in others]
    if members:
        print(f"an ensemble of {len(members) + 1} models, the mean of their class probabilities:")
        for path, member in zip(others, members):
            steps_taken = f"{member.inner_steps} steps" if getattr(member.learner, "takes_steps", True) else \
                "no inner steps"
            print(f"  {path}: {type(member.learner).__name__}, {steps_taken} at test")
        paths = [find_checkpoint(path).resolve() for path in args.checkpoint]
        if len(set(paths)) < len(paths):
            import warnings
            warnings.warn("the ensemble holds one checkpoint more than once; it counts that many times in the mean",
                          stacklevel=2)
    print(f"{loaded.path} (step {loaded.state.get('step', '?')}):")
    print(evaluate(learner, tasks, steps, device=config.training.device, progress=not args.quiet,
                   desc="evaluate", views=args.tta, view_augment=view_augment, ensemble=members).table())
    return 0


def _kind(config) -> str:
    """What a run that is not a classifier is, in words."""
    return f"a meta-RL run ({config.rl.env})" if config.rl.env is not None else f"{config.data.dataset} regression"


def _changes_per_run(paths, changes) -> dict:
    """Each run's changes: the same for all, except that in an ensemble ``--head`` goes to the runs
    that have heads."""
    if len(paths) == 1 or not changes.get("head"):
        return {path: changes for path in paths}
    heads = experiment.heads_for(paths, changes["head"])
    return {path: {**changes, "head": head} for path, head in zip(paths, heads)}


def ensemble_member(path, task, first, changes, args) -> Member:
    """Another model of ``eval RUN RUN...``, on the first run's device and scored on its tasks:
    an error naming the file when its images or classes cannot be those tasks'."""
    loaded = experiment.load_run(path, changes=changes, device=first.config.training.device,
                                 bn_statistics=args.bn_statistics, builder=common.build_learner)
    config, learner = loaded.config, loaded.learner
    if not getattr(learner, "classification", False):
        raise ValueError(f"an ensemble: {loaded.path} is {_kind(config)}; only classification runs' "
                         "probabilities can be averaged")
    shape, expected = (config.data.channels, config.data.image_size), (first.config.data.channels,
                                                                          first.config.data.image_size)
    if shape != expected:
        raise ValueError(f"an ensemble: {loaded.path} takes {shape[0]}-channel {shape[1]} px images, but "
                         f"{first.path}'s tasks are {expected[0]}-channel {expected[1]} px")
    try:
        learner.use_classes(task.support_y.shape[1])
    except ValueError as error:
        raise ValueError(f"an ensemble: {error}; {loaded.path} cannot be scored on {first.path}'s tasks") from None
    steps = args.inner_steps_test if args.inner_steps_test is not None else config.algorithm.inner_steps_test
    augment = view_augmentation(config.data.augment, config.data.augment_strokes) if args.tta > 1 else None
    return Member(learner, steps, augment)
