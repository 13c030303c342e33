"""Building a run from its configuration (``fastadapt.config.RunConfig``): data, model, learner.

``resolve`` turns a flat or nested dict (or a ``RunConfig``) into a checked ``RunConfig`` with the
defaults that depend on the data set filled in; the ``build_*`` functions make what it describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import algorithms, data, models
from .checkpoint import built_in_python, find_checkpoint, load_checkpoint, load_tensors
from .config import SECTIONS, ConfigError, RunConfig

# The MAML paper's settings (Finn, Abbeel and Levine, ICML 2017, section 5 and appendix A.1), as flat keys.
_OMNIGLOT = dict(dataset="omniglot", protocol="maml", rotations=True, k_query=15, meta_steps=60000, eval_every=1000)
_OMNIGLOT_5WAY = dict(_OMNIGLOT, n_way=5, task_batch=32, inner_steps=1, inner_steps_test=3, inner_lr=0.4)
_OMNIGLOT_20WAY = dict(_OMNIGLOT, n_way=20, task_batch=16, inner_steps=5, inner_steps_test=5, inner_lr=0.1)
PRESETS = {
    "omniglot-5w1s": dict(_OMNIGLOT_5WAY, k_shot=1),
    "omniglot-5w5s": dict(_OMNIGLOT_5WAY, k_shot=5),
    "omniglot-20w1s": dict(_OMNIGLOT_20WAY, k_shot=1),
    "omniglot-20w5s": dict(_OMNIGLOT_20WAY, k_shot=5),
    "miniimagenet-5w1s": dict(dataset="miniimagenet", n_way=5, k_shot=1, k_query=15, task_batch=4,
                              inner_steps=5, inner_steps_test=10, inner_lr=0.01, meta_steps=60000, eval_every=1000),
    "miniimagenet-5w5s": dict(dataset="miniimagenet", n_way=5, k_shot=5, k_query=15, task_batch=2,
                              inner_steps=5, inner_steps_test=10, inner_lr=0.01, meta_steps=60000, eval_every=1000),
    "sinusoid": dict(dataset="sinusoid", k_shot=10, k_query=10, task_batch=25, inner_steps=1,
                     inner_steps_test=10, inner_lr=0.01, meta_steps=70000, eval_every=5000, log_every=1000),
    # Lake's one-shot question on Omniglot's minimal set (docs/results.md): meta-train on
    # images_background_small1 alone, test with `fastadapt eval RUN --protocol lake`. The recipe
    # that scored best in the 600 s ablation: ProtoNet on 20-way 1-shot tasks drawn across the
    # alphabets (within-alphabet training tasks scored 3 points lower), with the rotated characters
    # as extra classes (3.6 points), augmented (26 points), cosine-annealed (2 points), 3,000
    # iterations (about what 600 s allows here; 8,000 gained nothing on unseen alphabets).
    # Validation runs once, at the end, so that nothing is selected on background_small2's unseen
    # alphabets. The MAML settings apply with --algo maml. Each drawing is framed (cropped to its
    # ink and centred, 80% of the image): a drawer's size and placement no longer reach the
    # network (3.4 points more on Lake's protocol, 4.6 one image at a time; docs/results.md).
    "omniglot-minimal-20w1s": dict(dataset="omniglot", train_split="background_small1",
                                   val_split="background_small2", algo="protonet", n_way=20, k_shot=1, k_query=5,
                                   task_batch=4, inner_steps=5, inner_lr=0.1, inner_steps_test=5, augment=True,
                                   rotations=True, cosine=True, frame=0.8, meta_steps=3000, eval_every=3000,
                                   log_every=100),
    # MAML-RL (Finn et al. 2017, sec. 5.3 and app. A.2; the 2D navigation settings of its PyTorch
    # reproduction): `fastadapt train --env NAME` starts from the preset of the same name.
    # navigation-2d takes its curvature from 10% of the trajectories: 0.43-0.53 s an iteration
    # against 0.51-0.60 s at 20%, with the same returns (docs/results.md, "Meta-RL").
    "navigation-2d": dict(env="navigation-2d", task_batch=20, trajectories=20, horizon=100, inner_steps=1,
                          inner_steps_test=3, inner_lr=0.1, hidden=64, activation="tanh", meta_steps=500,
                          eval_every=50, log_every=1, hvp_fraction=0.1),
    "halfcheetah-dir": dict(env="halfcheetah-dir", task_batch=40, trajectories=20, horizon=200, inner_steps=1,
                            inner_steps_test=3, inner_lr=0.1, hidden=100, activation="relu", meta_steps=500,
                            eval_every=50, log_every=1, hvp_fraction=0.2),
    "halfcheetah-vel": dict(env="halfcheetah-vel", task_batch=40, trajectories=20, horizon=200, inner_steps=1,
                            inner_steps_test=3, inner_lr=0.1, hidden=100, activation="relu", meta_steps=500,
                            eval_every=50, log_every=1, hvp_fraction=0.2),
}


def option_names() -> set:
    """The names of every registered algorithm's options (flat configuration keys)."""
    return {o.name for cls in algorithms.registered().values() for o in cls.accepted_options()}


def with_bn_statistics(config: RunConfig, statistics) -> RunConfig:
    """``config`` evaluated with BatchNorm's ``statistics`` ("batch" or "running", None: as trained).
    "batch" is every algorithm's default; "running" needs MAML++'s per-step statistics."""
    if statistics is None:
        return config
    accepted = {o.name for o in algorithms.registered()[config.algorithm.name].accepted_options()}
    if "bn_statistics" in accepted:
        return config.updated({"bn_statistics": statistics})
    if statistics == "batch":
        return config
    raise ConfigError("bn_statistics", f"is {statistics!r}, which needs a MAML++ run with per-step BatchNorm; "
                                       f"this is a {config.algorithm.name} run", "AlgorithmConfig.options['bn_statistics']")


def stored_config(stored: dict) -> RunConfig:
    """The ``RunConfig`` a checkpoint stores (nested, or an older checkpoint's flat dict), unchecked:
    what is changed for this machine (the device, say) is changed before ``resolve``.

    Flat dicts (fastadapt before the nested configuration) hold every algorithm's options, with
    their defaults where the user set nothing: ``outer_lr`` in a ProtoNet run, ``lslr=False`` in a
    ``mamlpp`` run, where it meant "MAML++'s choice" (on). Options the algorithm does not take, and
    false or zero ones (unset, in that version), are dropped here."""
    config = RunConfig.from_dict(stored)
    flat = not any(isinstance(stored.get(section), dict) for section in SECTIONS)
    algorithm = algorithms.registered().get(config.algorithm.name)
    if flat and algorithm is not None:
        accepted = {option.name for option in algorithm.accepted_options()}
        config.algorithm.options = {k: v for k, v in config.algorithm.options.items()
                                    if k in accepted and not (v is False or (type(v) is int and v == 0))}
    if flat and config.data.dataset in data.sources():
        accepted = {option.name for option in data.source(config.data.dataset).options}
        config.data.options = {k: v for k, v in config.data.options.items()
                               if k in accepted and v is not False and not (k == "glyph_classes" and v == 200)}
    return config


@dataclass
class Run:
    """A run loaded from its checkpoint: the file, what it holds, its configuration (checked, with
    the changes asked for) and its learner with the checkpoint's weights (None if not built)."""

    path: Path
    state: dict
    config: RunConfig
    learner: object = None


def load_run(checkpoint, changes=None, device=None, bn_statistics=None, learner=None, build: bool = True,
             builder=None) -> Run:
    """The run in ``checkpoint`` (a file, or a run folder's ``best.pt``, else ``last.pt``), its stored
    configuration with the flat ``changes`` applied, and, with ``build``, its learner (or the given
    ``learner``, for a model built in Python) loaded with its weights. ``device``: None keeps the
    stored one, ``"usable"`` keeps it if this machine has it (else the CPU), a name sets it.
    ``builder(config)`` builds the learner instead of ``build_learner`` (a meta-RL run's, which
    this layer does not know). Shared by ``eval``, ``predict`` (``Predictor.load``) and ``train
    --resume``; errors name the file and the cause."""
    path = find_checkpoint(checkpoint)
    state = load_checkpoint(path)
    stored = stored_config(state["config"])
    changes = dict(changes or {})
    if changes.get("head") and not _has_heads(stored.algorithm.name):
        raise ValueError(f"--head: {checkpoint} is a {stored.algorithm.name} run, which has no heads (pretrain runs "
                         "have)")
    if device is not None:
        changes["device"] = usable_device(stored.training.device) if device == "usable" else str(device)
    config = resolve(with_bn_statistics(stored.updated(changes), bn_statistics))
    if not build:
        return Run(path, state, config)
    bad = [name for name, value in state["model"].items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{path}: weights {bad[0]!r} (and {len(bad) - 1} more) are not finite; this checkpoint "
                         "cannot be evaluated")
    if learner is None and builder is not None:
        learner = builder(config)
    elif learner is None:
        if config.rl.env is not None:
            raise ValueError(f"{path}: a meta-RL run ({config.rl.env}); fastadapt eval {path} evaluates it")
        learner = build_learner(config)
    elif bn_statistics is not None:
        learner.bn_statistics = bn_statistics
    try:
        learner.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the model its config describes "
                         f"({str(error).splitlines()[-1].strip()}){built_in_python(state)}") from error
    return Run(path, state, config, learner.to(config.training.device))


def _has_heads(algorithm: str) -> bool:
    """Whether ``algorithm`` has a ``head`` option (the pretrained baseline's heads)."""
    return any(o.name == "head" for o in algorithms.registry.accepted_options(algorithms.registered()[algorithm]))


def heads_for(checkpoints, head: str) -> list:
    """One ``head`` for several runs (an ensemble): ``head`` for each run whose algorithm has an
    option of that name (the pretrained baseline's heads), None for the others; an error when
    none of them has one."""
    names = [load_run(c, build=False).config.algorithm.name for c in checkpoints]
    takes = [_has_heads(name) for name in names]
    if not any(takes):
        raise ValueError(f"--head: none of the runs has heads (they are {', '.join(sorted(set(names)))} runs)")
    return [head if t else None for t in takes]


def resolve(config=None) -> RunConfig:
    """A checked ``RunConfig`` from a flat or nested dict (or a ``RunConfig``), with the image size,
    channels and network width the data set implies filled in."""
    if isinstance(config, RunConfig):
        c = RunConfig.from_dict(config.to_dict())
    else:
        c = RunConfig.from_dict(config)
    d, m, a = c.data, c.model, c.algorithm
    d.check()
    m.check()
    c.training.check()
    known = algorithms.registered()
    if a.name not in known:
        raise ConfigError("algo", f"must be one of {', '.join(sorted(known))}, got {a.name!r}", "AlgorithmConfig.name")
    a.check(known[a.name].accepted_options())
    source = data.source(d.dataset)
    if source.loss != "cross_entropy" and getattr(known[a.name], "classifies_only", False):
        raise ConfigError("algo", f"{a.name} classifies; it cannot run the {d.dataset} regression tasks",
                          "AlgorithmConfig.name")
    d.image_size = d.image_size or source.image_size
    d.channels = d.channels or source.channels
    if m.backbone == "conv4":
        m.pool = m.pool or ("max" if d.image_size > 32 else "stride")
        m.hidden = m.hidden or (32 if m.pool == "max" else 64)
    elif m.hidden is not None or m.pool is not None:
        raise ConfigError("hidden" if m.hidden is not None else "pool",
                          "is conv4's; ResNet-12's widths are set with widths", "ModelConfig.hidden")
    if source.needs_root and not d.root:
        raise ConfigError("root", f"is needed for data set {d.dataset} (a folder)", "DataConfig.root")
    if source.fixed_channels and d.channels != source.channels:
        raise ConfigError("channels", f"is {d.channels}, but {d.dataset} images have {source.channels} "
                                      "channel(s)", "DataConfig.channels")
    if d.channels not in (1, 3):
        raise ConfigError("channels", f"must be 1 (grey) or 3 (RGB), got {d.channels!r}", "DataConfig.channels")
    source.check(c)
    check_device(c.training.device)
    if m.network is not None:
        _check_network(c)
    if m.backbone == "resnet12":
        if source.network != "conv4":
            raise ConfigError("backbone", f"resnet12 is an image network; the {d.dataset} run uses its MLP",
                              "ModelConfig.backbone")
        if m.network is not None:
            raise ConfigError("backbone", "resnet12 and a config-list network: give one", "ModelConfig.backbone")
        if d.image_size < 16:
            raise ConfigError("image_size", f"is {d.image_size}; resnet12 needs at least 16 (four 2x2 poolings)",
                              "DataConfig.image_size")
    return c


def check_device(device) -> None:
    """A device name this machine can use; the error says why not."""
    where = "TrainingConfig.device"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError("device", f"{device!r} is not a device name (cpu, cuda, cuda:N)", where) from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{device}: CUDA is not available here (this torch build "
                                        f"{'has no CUDA' if torch.version.cuda is None else 'finds no GPU'}); "
                                        "use device 'cpu'", where)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{device}: there are {torch.cuda.device_count()} CUDA devices", where)
    elif parsed.type not in ("cpu", "mps"):
        raise ConfigError("device", f"{device}: only cpu and cuda devices are supported", where)


def usable_device(device: str) -> str:
    """``device`` if this machine has it, else ``"cpu"`` (to evaluate a GPU-trained run anywhere)."""
    try:
        check_device(device)
        return device
    except ValueError:
        return "cpu"


def _check_network(c: RunConfig) -> None:
    """A config-list network (``ModelConfig.network``) must fit the run: its output is the class count."""
    where = "ModelConfig.network"
    if data.source(c.data.dataset).network != "conv4":
        raise ConfigError("network", f"is for image classifiers; the {c.data.dataset} run uses its MLP", where)
    if c.algorithm.name == "anil":
        raise ConfigError("network", "cannot be used with anil, which needs a network with 'features' and 'head' "
                                     "parts (conv4)", where)
    try:
        network = models.Learner(c.model.network)
    except ValueError as error:
        raise ConfigError("network", f"is not a valid config list: {error}", where) from error
    linear = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    if c.algorithm.name != "protonet" and linear and linear[-1].out_features != c.data.n_way:
        raise ConfigError("network", f"ends in a linear layer of {linear[-1].out_features} outputs, but n_way is "
                                     f"{c.data.n_way}", where)


def default_transform(c: RunConfig):
    """The preprocessing a data set's loader applies, for a checkpoint that does not store it (older
    than the ``transform`` entry); None for data that are not images. A folder's polarity is unknown."""
    return data.source(c.data.dataset).default_transform(c)


def build_model(c: RunConfig):
    if data.source(c.data.dataset).network == "mlp":
        return models.mlp()
    if c.model.network is not None:  # the reference code's config list, with its initialisation
        return models.reference_init_(models.Learner(c.model.network))
    outputs = c.model.outputs or c.data.n_way
    if c.model.backbone == "resnet12":
        return models.resnet12(c.data.channels, outputs, c.model.widths or models.RESNET12_WIDTHS, c.data.image_size,
                               c.model.drop_block)
    return models.conv4(c.data.channels, outputs, c.model.hidden, c.data.image_size, c.model.pool, c.model.norm)


def build_learner(c: RunConfig, model=None):
    """The registered algorithm ``c.algorithm.name``, built by its ``from_config``, on ``c.training.device``."""
    model = build_model(c) if model is None else model
    dtype = {"float32": torch.float32, "float64": torch.float64}[c.model.dtype]
    learner = algorithms.registry.build(model, c)
    return learner.to(device=c.training.device, dtype=dtype)


def build_data(c: RunConfig, splits=("train", "val", "test")):
    """The training task stream and the fixed validation and test tasks named in ``splits``, as the
    run's data set (``data.source``) builds them: episodes, or for a learner trained by ordinary
    classification (``class_batch_size``) labelled mini-batches, whose class count then sizes the
    network's head (``ModelConfig.outputs``, set here when not given)."""
    size = algorithms.registered()[c.algorithm.name].class_batch_size(c)
    if size is None:
        return data.source(c.data.dataset).build(c, splits)
    out = data.source(c.data.dataset).build(c, splits, class_batches=size)
    if "train" in out:
        classes = out["train"].dataset.num_classes
        if c.model.outputs not in (None, classes):
            raise ConfigError("outputs", f"is {c.model.outputs}, but {c.algorithm.name} classifies the {classes} "
                                         "training classes", "ModelConfig.outputs")
        c.model.outputs = classes
    return out


def protocol_tasks(c: RunConfig, protocol: str, split=None, names=None, count: int = 600):
    """``(tasks, lines to print)`` of an evaluation protocol of the run's data set (Omniglot's ``lake``)."""
    return data.source(c.data.dataset).protocol_tasks(c, protocol, split, names, count)


def _shape(tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def load_init(learner, source) -> str:
    """Start ``learner``'s network from the backbone (its ``features``) of ``source``: a run folder
    (its best.pt, else last.pt), a fastadapt checkpoint, or a file holding a network's state dict
    (``torch.save(model.state_dict(), path)``; a ``module.`` prefix, as DistributedDataParallel
    writes, is read too). The head is loaded as well when its shapes agree (a pretrained
    classifier over the training classes does not fit a 5-way head, and is left as initialised).
    Returns the line saying what was loaded; errors name the file, the weight and both shapes."""
    path = Path(source)
    if path.is_dir():
        path = find_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init {source}: no such run folder or file")
    expected = "expected a run folder, a fastadapt checkpoint or a torch.save'd state dict"
    payload = load_tensors(path, expected)
    state = payload.get("model") if isinstance(payload, dict) and isinstance(payload.get("model"), dict) else payload
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--init {path}: holds no tensors by name; {expected}")
    weights = {}
    for name, value in state.items():
        for prefix in ("model.", "module."):
            name = name[len(prefix):] if name.startswith(prefix) else name
        if torch.is_tensor(value):
            weights[name] = value
    network = learner.model if hasattr(learner, "model") else learner
    target = network.state_dict()
    backbone = [name for name in target if name.startswith("features.")]
    if not backbone:
        raise ValueError("--init: this network has no 'features' part to load (conv4 and resnet12 have one)")
    missing = [name for name in backbone if name not in weights]
    if len(missing) == len(backbone):
        sample = ", ".join(sorted(weights)[:4])
        raise ValueError(f"--init {path}: holds none of this network's backbone weights ({backbone[0]}, ...; it "
                         f"holds {sample}, ...): is it a run of another backbone?")
    fresh = [name for name in missing if name.endswith(".blend")]  # TaskNorm's, from a BatchNorm network
    missing = [name for name in missing if name not in fresh]
    if missing:
        raise ValueError(f"--init {path}: lacks {missing[0]} (and {len(missing) - 1} more) of this network's backbone")
    backbone = [name for name in backbone if name not in fresh]
    for name in backbone:
        if weights[name].shape != target[name].shape:
            raise ValueError(f"--init {path}: {name} is {_shape(weights[name])} there but {_shape(target[name])} in "
                             "this network; --backbone, --hidden, --widths and --channels must be those of the run "
                             "it comes from")
    head = [name for name in target if not name.startswith("features.")]
    head_fits = all(name in weights and weights[name].shape == target[name].shape for name in head)
    chosen = backbone + (head if head_fits else [])
    with torch.no_grad():
        for name in chosen:
            target[name].copy_(weights[name])
    blends = f"; TaskNorm's {len(fresh)} blend weights start as initialised (none there)" if fresh else ""
    if head_fits and head:
        return f"--init: backbone and head ({len(chosen)} tensors) loaded from {path}{blends}"
    return (f"--init: backbone ({len(backbone)} tensors) loaded from {path}; the head is new"
            + (f" (there {_shape(weights[head[0]])}, here {_shape(target[head[0]])})"
               if head and head[0] in weights else "") + blends)
