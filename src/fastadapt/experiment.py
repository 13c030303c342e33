"""A run's configuration, and building its data, model and learner from it.

The configuration is a flat dict of plain values (it is stored in every checkpoint, so a run can
be evaluated, resumed or used for prediction without its command line).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import algorithms, data, models

DEFAULTS = dict(
    dataset="glyphs", root=None, download=False, algo="maml",
    n_way=5, k_shot=1, k_query=15, task_batch=8, inner_steps=3, inner_steps_test=5,
    inner_lr=0.4, meta_lr=1e-3, first_order=False, steps=300, eval_every=500, log_every=30,
    val_episodes=100, test_episodes=600, eval_batch=25, seed=0, device="cpu",
    image_size=None, channels=None, hidden=None, pool=None, cosine=False, clip_grad=None,
    train_split=None, val_split=None, test_split=None, train_alphabets=None, val_alphabets=None,
    test_alphabets=None, rotations=False, protocol=None, glyph_classes=200, task_chunk="auto",
    dtype="float32", outer_lr=1.0, multi_step_loss=0, lslr=False, first_order_until=0,
    per_step_bn=False, bn_statistics="batch", network=None, checkpoint_every=300.0, time_limit=None,
    threads=None, augment=False, group_by=None,
)

# The MAML paper's settings (Finn, Abbeel and Levine, ICML 2017, section 5 and appendix A.1).
_OMNIGLOT = dict(dataset="omniglot", protocol="maml", rotations=True, k_query=15, steps=60000, eval_every=1000)
_OMNIGLOT_5WAY = dict(_OMNIGLOT, n_way=5, task_batch=32, inner_steps=1, inner_steps_test=3, inner_lr=0.4)
_OMNIGLOT_20WAY = dict(_OMNIGLOT, n_way=20, task_batch=16, inner_steps=5, inner_steps_test=5, inner_lr=0.1)
PRESETS = {
    "omniglot-5w1s": dict(_OMNIGLOT_5WAY, k_shot=1),
    "omniglot-5w5s": dict(_OMNIGLOT_5WAY, k_shot=5),
    "omniglot-20w1s": dict(_OMNIGLOT_20WAY, k_shot=1),
    "omniglot-20w5s": dict(_OMNIGLOT_20WAY, k_shot=5),
    "miniimagenet-5w1s": dict(dataset="miniimagenet", n_way=5, k_shot=1, k_query=15, task_batch=4,
                              inner_steps=5, inner_steps_test=10, inner_lr=0.01, steps=60000, eval_every=1000),
    "miniimagenet-5w5s": dict(dataset="miniimagenet", n_way=5, k_shot=5, k_query=15, task_batch=2,
                              inner_steps=5, inner_steps_test=10, inner_lr=0.01, steps=60000, eval_every=1000),
    "sinusoid": dict(dataset="sinusoid", k_shot=10, k_query=10, task_batch=25, inner_steps=1,
                     inner_steps_test=10, inner_lr=0.01, steps=70000, eval_every=5000, log_every=1000),
}

DATASETS = ("glyphs", "omniglot", "miniimagenet", "folder", "sinusoid")


def _has_batch_norm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _maml(model, c, loss, **overrides):
    options = dict(first_order=c["first_order"], multi_step_loss=c["multi_step_loss"], lslr=c["lslr"],
                   first_order_until=c["first_order_until"], per_step_bn=c["per_step_bn"],
                   bn_statistics=c["bn_statistics"])
    options.update(overrides)
    return algorithms.MAML(model, c["inner_lr"], c["inner_steps"], loss=loss, task_chunk=c["task_chunk"], **options)


ALGORITHMS = {
    "maml": _maml,
    # MAML++ with every option on; the schedule lengths are this project's choice (the paper counts
    # epochs): multi-step loss annealed over the first 10% of training, first order for the first third;
    # per-step BatchNorm where the model has BatchNorm.
    "mamlpp": lambda model, c, loss: _maml(model, c, loss, lslr=True, multi_step_loss=max(1, c["steps"] // 10),
                                           first_order_until=c["steps"] // 3,
                                           per_step_bn=c["per_step_bn"] or _has_batch_norm(model)),
    "fomaml": lambda model, c, loss: _maml(model, c, loss, first_order=True),
    "metasgd": lambda model, c, loss: algorithms.MetaSGD(model, c["inner_lr"], c["inner_steps"], c["first_order"],
                                                         loss=loss, task_chunk=c["task_chunk"]),
    "anil": lambda model, c, loss: algorithms.ANIL(model, c["inner_lr"], c["inner_steps"], c["first_order"],
                                                   loss=loss, task_chunk=c["task_chunk"]),
    "reptile": lambda model, c, loss: algorithms.Reptile(model, c["inner_lr"], c["inner_steps"], c["outer_lr"],
                                                         loss=loss, task_chunk=c["task_chunk"]),
    "protonet": lambda model, c, loss: algorithms.ProtoNet(
        model, c["n_way"], task_chunk=c["task_chunk"], embedding="features" if hasattr(model, "features") else None),
}


def resolve(config: dict) -> dict:
    """Fill the derived defaults (image size, channels, network width) for the data set."""
    c = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if c["dataset"] not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {c['dataset']!r}")
    if c["dtype"] not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {c['dtype']!r}")
    if c["algo"] not in ALGORITHMS:
        raise ValueError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {c['algo']!r}")
    if c["group_by"] not in (None, "alphabet"):
        raise ValueError(f"--group-by must be alphabet, got {c['group_by']!r}")
    if c["bn_statistics"] not in ("batch", "running"):
        raise ValueError(f"--bn-statistics must be batch or running, got {c['bn_statistics']!r}")
    if c["bn_statistics"] == "running" and not (c["per_step_bn"] or c["algo"] == "mamlpp"):
        raise ValueError("--bn-statistics running reads per-step statistics recorded in meta-training: "
                         "it needs a run trained with --per-step-bn (or --algo mamlpp)")
    if c["per_step_bn"] and c["algo"] not in ("maml", "fomaml", "mamlpp"):
        raise ValueError(f"--per-step-bn is a MAML++ option (maml, fomaml, mamlpp), not of --algo {c['algo']}")
    if c["algo"] == "protonet" and c["dataset"] == "sinusoid":
        raise ValueError("--algo protonet classifies; it cannot run the sinusoid regression tasks")
    _check_ranges(c)
    mini = c["dataset"] == "miniimagenet"
    c["image_size"] = c["image_size"] or (84 if mini else 28)
    c["channels"] = c["channels"] or (3 if c["dataset"] in ("miniimagenet", "folder") else 1)
    c["pool"] = c["pool"] or ("max" if c["image_size"] > 32 else "stride")
    c["hidden"] = c["hidden"] or (32 if c["pool"] == "max" else 64)
    if c["dataset"] in ("omniglot", "miniimagenet", "folder") and not c["root"]:
        raise ValueError(f"--dataset {c['dataset']} needs --root PATH")
    grey_only = {"glyphs": 1, "omniglot": 1, "miniimagenet": 3}
    if c["dataset"] in grey_only and c["channels"] != grey_only[c["dataset"]]:
        raise ValueError(f"--channels (--imgc) {c['channels']}: {c['dataset']} images have "
                         f"{grey_only[c['dataset']]} channel(s)")
    if c["channels"] not in (1, 3):
        raise ValueError(f"--channels (--imgc) must be 1 (grey) or 3 (RGB), got {c['channels']!r}")
    check_device(c["device"])
    if c["network"] is not None:
        _check_network(c)
    return c


_POSITIVE_INTS = ("n_way", "k_shot", "k_query", "task_batch", "steps", "val_episodes", "test_episodes", "eval_batch",
                  "eval_every", "log_every", "glyph_classes")
_NON_NEGATIVE_INTS = ("inner_steps", "inner_steps_test", "multi_step_loss", "first_order_until")
_OPTIONAL_POSITIVE_INTS = ("hidden", "image_size", "channels", "threads")
_POSITIVE_FLOATS = ("inner_lr", "meta_lr", "outer_lr")
_OPTIONAL_POSITIVE_FLOATS = ("clip_grad", "time_limit")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_ranges(c: dict) -> None:
    """Every numeric option in its range, with an error naming the option."""
    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool)

    for key in _POSITIVE_INTS:
        if not integer(c[key]) or c[key] <= 0:
            raise ValueError(f"{_flag(key)} must be a positive integer, got {c[key]!r}")
    for key in _NON_NEGATIVE_INTS:
        if not integer(c[key]) or c[key] < 0:
            raise ValueError(f"{_flag(key)} must be a non-negative integer, got {c[key]!r}")
    for key in _OPTIONAL_POSITIVE_INTS:
        if c[key] is not None and (not integer(c[key]) or c[key] <= 0):
            raise ValueError(f"{_flag(key)} must be a positive integer, got {c[key]!r}")
    for key in _POSITIVE_FLOATS + _OPTIONAL_POSITIVE_FLOATS:
        value = c[key]
        if value is None and key in _OPTIONAL_POSITIVE_FLOATS:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{_flag(key)} must be a positive finite number, got {value!r}")
    every = c["checkpoint_every"]
    if not isinstance(every, (int, float)) or not math.isfinite(every) or every < 0:
        raise ValueError(f"--checkpoint-every must be a non-negative number of seconds, got {every!r}")


def check_device(device) -> None:
    """A device name this machine can use; the error says why not."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (this torch build "
                             f"{'has no CUDA' if torch.version.cuda is None else 'finds no GPU'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif parsed.type not in ("cpu", "mps"):
        raise ValueError(f"--device {device}: only cpu and cuda devices are supported")


def usable_device(device: str) -> str:
    """``device`` if this machine has it, else ``"cpu"`` (to evaluate a GPU-trained run anywhere)."""
    try:
        check_device(device)
        return device
    except ValueError:
        return "cpu"


def _check_network(c: dict) -> None:
    """A config-list network (``--network``) must fit the run: its output is the class count."""
    if c["dataset"] == "sinusoid":
        raise ValueError("--network is for image classifiers; the sinusoid run uses its MLP")
    if c["algo"] == "anil":
        raise ValueError("--algo anil needs a network with 'features' and 'head' parts (conv4), not --network")
    try:
        network = models.Learner(c["network"])
    except ValueError as error:
        raise ValueError(f"--network: {error}") from error
    linear = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    if c["algo"] != "protonet" and linear and linear[-1].out_features != c["n_way"]:
        raise ValueError(f"--network: the last linear layer gives {linear[-1].out_features} outputs, but --n-way "
                         f"is {c['n_way']}")


def default_transform(c: dict):
    """The preprocessing a data set's loader applies, for a checkpoint that does not store it (older
    than the ``transform`` entry); None for sinusoid. A folder's polarity is unknown here."""
    loaders = {"omniglot": data.Omniglot, "glyphs": data.Glyphs, "miniimagenet": data.MiniImageNet}
    if c["dataset"] == "sinusoid":
        return None
    if c["dataset"] in loaders:
        return loaders[c["dataset"]].default_transform(c["image_size"])
    return data.ImageTransform(c["image_size"], c["channels"])


def build_model(c: dict):
    if c["dataset"] == "sinusoid":
        return models.mlp()
    if c["network"] is not None:  # the reference code's config list, with its initialisation
        return models.reference_init_(models.Learner(c["network"]))
    return models.conv4(c["channels"], c["n_way"], c["hidden"], c["image_size"], c["pool"])


def build_learner(c: dict, model=None):
    model = build_model(c) if model is None else model
    loss = "mse" if c["dataset"] == "sinusoid" else "cross_entropy"
    dtype = {"float32": torch.float32, "float64": torch.float64}[c["dtype"]]
    return ALGORITHMS[c["algo"]](model, c, loss).to(device=c["device"], dtype=dtype)


def _alphabets(value):
    """Alphabet names from a comma-separated option (or a list, from the Python API)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [name for name in value.split(",") if name]
    return list(value)


def build_sets(c: dict):
    """(train, val, test) class-indexed sets of an image data set."""
    name, root = c["dataset"], c["root"]
    size = c["image_size"]
    if name == "glyphs":
        return tuple(data.Glyphs(num_classes=n, image_size=size, seed=c["seed"], split=s)
                     for s, n in (("train", c["glyph_classes"]), ("val", 50), ("test", 100)))
    if name == "omniglot":
        if c["protocol"] == "maml":
            return data.maml_protocol(root, val_classes=100, seed=c["seed"], image_size=size,
                                      rotations=c["rotations"], download=c["download"])
        if c["protocol"] not in (None, "official"):
            raise ValueError(f"--protocol must be 'maml' or 'official', got {c['protocol']!r}")
        train_split = c["train_split"] or "background"
        val_split = c["val_split"] or "evaluation"

        def load(split, alphabets, rotations):
            return data.Omniglot(root, split, image_size=size, rotations=rotations, download=c["download"],
                                 alphabets=_alphabets(alphabets))
        train = load(train_split, c["train_alphabets"], c["rotations"])
        val = load(val_split, c["val_alphabets"], False)
        test = load(c["test_split"] or val_split, c["test_alphabets"] or c["val_alphabets"], False)
        return train, val, test
    if name == "miniimagenet":
        return tuple(data.MiniImageNet(root, s, image_size=size) for s in ("train", "val", "test"))
    if name == "folder":
        root = Path(root)
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        return tuple(data.ImageFolder(d, image_size=size, channels=c["channels"])
                     for d in (root / "train", root / "val", test_dir))
    raise ValueError(f"no image sets for dataset {name!r}")


def fixed_tasks(c: dict, dataset, count: int, seed_offset: int):
    """``count`` fixed tasks in batches of ``eval_batch`` (the same on every call)."""
    batch = min(c["eval_batch"], count)
    if c["dataset"] == "sinusoid":
        tasks = data.Sinusoid(c["k_shot"], c["k_query"], seed=c["seed"] + seed_offset).sample(count)
        return list(tasks.split(batch))
    sampler = data.EpisodeSampler(dataset, c["n_way"], c["k_shot"], c["k_query"], batch, seed=c["seed"] + seed_offset)
    return _first_tasks(sampler, count)


def _first_tasks(sampler, count: int):
    """The sampler's fixed meta-batches holding its first ``count`` tasks (the last one cut short)."""
    batch = sampler.batch_size
    episodes = sampler.fixed(math.ceil(count / batch))
    extra = len(episodes) * batch - count
    if extra:
        episodes[-1] = episodes[-1][: batch - extra]
    return episodes


def lake_tasks(c: dict, split: str = "background_small2", alphabets=None, count: int = 600):
    """Lake et al.'s one-shot protocol (Science 2015) on an Omniglot split: 20-way 1-shot, every
    task's 20 characters from one alphabet, its support images by one drawer and its queries (one
    per character) by another. ``count`` fixed tasks, in batches of ``eval_batch``."""
    if c["dataset"] != "omniglot":
        raise ValueError(f"--protocol lake evaluates on Omniglot; this run's data set is {c['dataset']}")
    images = data.Omniglot(c["root"], split, image_size=c["image_size"], alphabets=_alphabets(alphabets))
    batch = min(c["eval_batch"], count)
    sampler = data.EpisodeSampler(images, 20, 1, 1, batch, seed=c["seed"] + 2, group_by="alphabet",
                                  drawers="disjoint")
    return _first_tasks(sampler, count)


def build_data(c: dict, splits=("train", "val", "test")):
    """The training task stream and the fixed validation and test tasks named in ``splits``."""
    out = {}
    if c["dataset"] == "sinusoid":
        if "train" in splits:
            out["train"] = data.Sinusoid(c["k_shot"], c["k_query"], seed=c["seed"], batch_size=c["task_batch"])
        if "val" in splits:
            out["val"] = fixed_tasks(c, None, c["val_episodes"], 1)
        if "test" in splits:
            out["test"] = fixed_tasks(c, None, c["test_episodes"], 2)
        return out
    train, val, test = build_sets(c)
    if "train" in splits:
        out["train"] = data.EpisodeSampler(train, c["n_way"], c["k_shot"], c["k_query"], c["task_batch"],
                                           seed=c["seed"], augment=data.RandomAffine() if c["augment"] else None,
                                           group_by=c["group_by"])
    if "val" in splits:
        out["val"] = fixed_tasks(c, val, c["val_episodes"], 1)
    if "test" in splits:
        out["test"] = fixed_tasks(c, test, c["test_episodes"], 2)
    return out
