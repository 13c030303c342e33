"""Building a run from its configuration (``fastadapt.config.RunConfig``): data, model, learner.

``resolve`` turns a flat or nested dict (or a ``RunConfig``) into a checked ``RunConfig`` with the
defaults that depend on the data set filled in; the ``build_*`` functions make what it describes.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import algorithms, data, models
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
    # alphabets. The MAML settings apply with --algo maml.
    "omniglot-minimal-20w1s": dict(dataset="omniglot", train_split="background_small1",
                                   val_split="background_small2", algo="protonet", n_way=20, k_shot=1, k_query=5,
                                   task_batch=4, inner_steps=5, inner_lr=0.1, inner_steps_test=5, augment=True,
                                   rotations=True, cosine=True, meta_steps=3000, eval_every=3000, log_every=100),
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
    return config


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
    if a.name == "protonet" and d.dataset == "sinusoid":
        raise ConfigError("algo", "protonet classifies; it cannot run the sinusoid regression tasks",
                          "AlgorithmConfig.name")
    mini = d.dataset == "miniimagenet"
    d.image_size = d.image_size or (84 if mini else 28)
    d.channels = d.channels or (3 if d.dataset in ("miniimagenet", "folder") else 1)
    m.pool = m.pool or ("max" if d.image_size > 32 else "stride")
    m.hidden = m.hidden or (32 if m.pool == "max" else 64)
    if d.dataset in ("omniglot", "miniimagenet", "folder") and not d.root:
        raise ConfigError("root", f"is needed for data set {d.dataset} (a folder)", "DataConfig.root")
    fixed_channels = {"glyphs": 1, "omniglot": 1, "miniimagenet": 3}
    if d.dataset in fixed_channels and d.channels != fixed_channels[d.dataset]:
        raise ConfigError("channels", f"is {d.channels}, but {d.dataset} images have {fixed_channels[d.dataset]} "
                                      "channel(s)", "DataConfig.channels")
    if d.channels not in (1, 3):
        raise ConfigError("channels", f"must be 1 (grey) or 3 (RGB), got {d.channels!r}", "DataConfig.channels")
    check_device(c.training.device)
    if m.network is not None:
        _check_network(c)
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
    if c.data.dataset == "sinusoid":
        raise ConfigError("network", "is for image classifiers; the sinusoid run uses its MLP", where)
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
    than the ``transform`` entry); None for sinusoid. A folder's polarity is unknown here."""
    loaders = {"omniglot": data.Omniglot, "glyphs": data.Glyphs, "miniimagenet": data.MiniImageNet}
    if c.data.dataset == "sinusoid":
        return None
    if c.data.dataset in loaders:
        return loaders[c.data.dataset].default_transform(c.data.image_size)
    return data.ImageTransform(c.data.image_size, c.data.channels)


def build_model(c: RunConfig):
    if c.data.dataset == "sinusoid":
        return models.mlp()
    if c.model.network is not None:  # the reference code's config list, with its initialisation
        return models.reference_init_(models.Learner(c.model.network))
    return models.conv4(c.data.channels, c.data.n_way, c.model.hidden, c.data.image_size, c.model.pool)


def build_learner(c: RunConfig, model=None):
    """The registered algorithm ``c.algorithm.name``, built by its ``from_config``, on ``c.training.device``."""
    model = build_model(c) if model is None else model
    dtype = {"float32": torch.float32, "float64": torch.float64}[c.model.dtype]
    learner = algorithms.registry.build(model, c)
    return learner.to(device=c.training.device, dtype=dtype)


def _alphabets(value):
    """Alphabet names from a comma-separated option (or a list, from the Python API)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [name for name in value.split(",") if name]
    return list(value)


def _warn_if_seen(trained, named, what: str, train_split: str) -> None:
    """Named evaluation alphabets that the model trained on score its memory, not one-shot learning."""
    seen = sorted(set(named or ()) & set(trained))
    if seen:
        warnings.warn(f"{what} include {', '.join(seen)}, which the run trained on (Omniglot split "
                      f"{train_split!r} has the same characters): their scores measure memory, not one-shot "
                      "learning", stacklevel=3)


def trained_alphabets(c: RunConfig) -> list:
    """The Omniglot alphabets a run meta-trained on, from its configuration and the training split's
    file names (the MAML protocol pools every alphabet)."""
    d = c.data
    if d.protocol == "maml":
        return data.alphabets_of(d.root, "background") + data.alphabets_of(d.root, "evaluation")
    return _alphabets(d.train_alphabets) or data.alphabets_of(d.root, d.train_split or "background")


def build_sets(c: RunConfig):
    """(train, val, test) class-indexed sets of an image data set."""
    d, seed = c.data, c.training.seed
    name, root, size = d.dataset, d.root, d.image_size
    if name == "glyphs":
        return tuple(data.Glyphs(num_classes=n, image_size=size, seed=seed, split=s)
                     for s, n in (("train", d.glyph_classes), ("val", 50), ("test", 100)))
    if name == "omniglot":
        if d.protocol == "maml":
            return data.maml_protocol(root, val_classes=100, seed=seed, image_size=size,
                                      rotations=d.rotations, download=d.download)
        train_split = d.train_split or "background"
        val_split = d.val_split or "evaluation"

        def load(split, alphabets, rotations, exclude=()):
            return data.Omniglot(root, split, image_size=size, rotations=rotations, download=d.download,
                                 alphabets=_alphabets(alphabets), exclude_alphabets=exclude)
        train = load(train_split, d.train_alphabets, d.rotations)
        trained = sorted(set(train.alphabets))
        test_split, test_alphabets = d.test_split or val_split, d.test_alphabets or d.val_alphabets
        val = load(val_split, d.val_alphabets, False, () if d.val_alphabets else trained)
        test = load(test_split, test_alphabets, False, () if test_alphabets else trained)
        for part, split, named in (("validation", val_split, d.val_alphabets), ("test", test_split, test_alphabets)):
            _warn_if_seen(trained, _alphabets(named), f"the {part} alphabets of {split!r}", train_split)
        return train, val, test
    if name == "miniimagenet":
        return tuple(data.MiniImageNet(root, s, image_size=size) for s in ("train", "val", "test"))
    if name == "folder":
        root = Path(root)
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        return tuple(data.ImageFolder(folder, image_size=size, channels=d.channels)
                     for folder in (root / "train", root / "val", test_dir))
    raise ValueError(f"no image sets for dataset {name!r}")


def fixed_tasks(c: RunConfig, dataset, count: int, seed_offset: int):
    """``count`` fixed tasks in batches of ``eval_batch`` (the same on every call)."""
    d = c.data
    batch = min(d.eval_batch, count)
    seed = c.training.seed + seed_offset
    if d.dataset == "sinusoid":
        return list(data.Sinusoid(d.k_shot, d.k_query, seed=seed).sample(count).split(batch))
    return _first_tasks(data.EpisodeSampler(dataset, d.n_way, d.k_shot, d.k_query, batch, seed=seed), count)


def _first_tasks(sampler, count: int):
    """The sampler's fixed meta-batches holding its first ``count`` tasks (the last one cut short)."""
    batch = sampler.batch_size
    episodes = sampler.fixed(math.ceil(count / batch))
    extra = len(episodes) * batch - count
    if extra:
        episodes[-1] = episodes[-1][: batch - extra]
    return episodes


def lake_tasks(c: RunConfig, split: str = "background_small2", alphabets=None, count: int = 600):
    """Lake et al.'s one-shot protocol (Science 2015) on an Omniglot split: 20-way 1-shot, every
    task's 20 characters from one alphabet, its support images by one drawer and its queries (one
    per character) by another; ``count`` fixed tasks, in batches of ``eval_batch``.

    Only alphabets the run did not train on are used, unless ``alphabets`` names some: the minimal
    sets share Greek and Latin, image for image, and a model trained on ``background_small1``
    scores its memory on them. Alphabets with fewer than 20 characters are skipped.
    Returns ``(tasks, alphabets tested, alphabets left out as seen in training)``."""
    if c.data.dataset != "omniglot":
        raise ValueError(f"--protocol lake evaluates on Omniglot; this run's data set is {c.data.dataset}")
    chosen = _alphabets(alphabets)
    try:
        trained = trained_alphabets(c)
    except FileNotFoundError as error:
        if chosen is None:
            raise FileNotFoundError(f"{error}. The protocol leaves out the alphabets the run trained on, so it "
                                    "reads the training split's names; or name the alphabets to test on "
                                    "(--alphabets)") from None
        trained = []
    _warn_if_seen(trained, chosen, f"the alphabets of {split!r}", c.data.train_split or "background")
    images = data.Omniglot(c.data.root, split, image_size=c.data.image_size, alphabets=chosen,
                           exclude_alphabets=() if chosen else trained)
    sizes = Counter(images.alphabets)
    batch = min(c.data.eval_batch, count)
    sampler = data.EpisodeSampler(images, 20, 1, 1, batch, seed=c.training.seed + 2, group_by="alphabet",
                                  drawers="disjoint")
    return _first_tasks(sampler, count), sorted(a for a, n in sizes.items() if n >= 20), images.left_out


def build_data(c: RunConfig, splits=("train", "val", "test")):
    """The training task stream and the fixed validation and test tasks named in ``splits``."""
    d, seed, out = c.data, c.training.seed, {}
    if d.dataset == "sinusoid":
        sets = (None, None, None)
        if "train" in splits:
            out["train"] = data.Sinusoid(d.k_shot, d.k_query, seed=seed, batch_size=d.task_batch)
    else:
        sets = build_sets(c)
        if "train" in splits:
            out["train"] = data.EpisodeSampler(sets[0], d.n_way, d.k_shot, d.k_query, d.task_batch, seed=seed,
                                               augment=data.RandomAffine() if d.augment else None,
                                               group_by=d.group_by)
    if "val" in splits:
        out["val"] = fixed_tasks(c, sets[1], d.val_episodes, 1)
    if "test" in splits:
        out["test"] = fixed_tasks(c, sets[2], d.test_episodes, 2)
    return out
