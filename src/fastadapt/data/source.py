"""Data sets by name: each data set's file declares a ``DataSource`` that says what a run needs.

A ``DataSource`` subclass with a ``name`` registers itself when its class is defined, the way an
algorithm does: its ``options`` (``config.Option``) become ``DataConfig.options`` entries and
command-line flags, its class attributes give the defaults that depend on the data set (image
size, channels, whether a ``root`` is needed, regression or classification, the network), and
``build_sets`` makes the train/val/test class-indexed sets from a ``RunConfig``. The default
``build`` turns those into the training task stream (``EpisodeSampler``) and the fixed
validation and test tasks; a data set that is not a class-indexed image set (sinusoid) overrides
``build``. ``protocols`` names evaluation protocols of its own (Omniglot's ``lake``).

Nothing here imports a model or an algorithm.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, Optional, Tuple

from .. import config as config_module
from ..config import Option
from .augment import training_augmentation
from .sampler import ClassBatchSampler, EpisodeSampler
from .transform import ImageTransform

_SOURCES: Dict[str, type] = {}


def sources() -> Dict[str, type]:
    """Every registered data set, by name (the ``--dataset`` choices)."""
    return dict(_SOURCES)


def source(name: str) -> type:
    """The data set registered as ``name``; a one-line error listing the names otherwise."""
    if name not in _SOURCES:
        raise ValueError(f"unknown data set {name!r}; the data sets are {', '.join(sorted(_SOURCES))}")
    return _SOURCES[name]


class DataSource:
    """What a run needs of one data set; subclasses set ``name`` and implement ``build_sets``."""

    name: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ""
    options: ClassVar[Tuple[Option, ...]] = ()
    needs_root: ClassVar[bool] = True
    image_size: ClassVar[int] = 28             # default DataConfig.image_size
    channels: ClassVar[int] = 1                # default DataConfig.channels
    fixed_channels: ClassVar[bool] = True      # the files have exactly ``channels`` channels
    loss: ClassVar[str] = "cross_entropy"      # "mse": regression tasks
    network: ClassVar[str] = "conv4"           # the model family the run builds: conv4 or mlp
    protocols: ClassVar[Dict[str, str]] = {}   # evaluation protocols of its own: name -> help
    ignores: ClassVar[Dict[str, str]] = {}     # shared settings that mean nothing here: flat key -> why

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        taken = _SOURCES.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"data set name {name!r} is taken by {taken.__qualname__}")
        _SOURCES[name] = cls
        config_module.declare_dataset(name, loss=cls.loss, options=cls.options)

    # ------------------------------------------------------------------ what a data set defines
    @classmethod
    def build_sets(cls, config) -> tuple:
        """The (train, val, test) class-indexed sets (``ImageSet``s) of ``config``."""
        raise NotImplementedError

    @classmethod
    def check(cls, config) -> None:
        """Refuse settings this data set cannot serve (``ConfigError``); by default none."""

    @classmethod
    def default_transform(cls, config) -> Optional[ImageTransform]:
        """How this data set reads its files, for a checkpoint older than the stored ``transform``."""
        return ImageTransform(config.data.image_size, config.data.channels)

    @classmethod
    def test_is_validation(cls, config) -> bool:
        """Whether the run's test tasks come from the same classes as its validation tasks (no
        test split of its own); by default they do not."""
        return False

    @classmethod
    def describe(cls, config) -> str:
        """The task shape in words (``5-way 1-shot``)."""
        return f"{config.data.n_way}-way {config.data.k_shot}-shot"

    @classmethod
    def tag(cls, config) -> str:
        """The task shape in a default run folder's name (``5w1s``)."""
        return f"{config.data.n_way}w{config.data.k_shot}s"

    @classmethod
    def protocol_tasks(cls, config, protocol: str, split=None, names=None, count: int = 600):
        """``(tasks, lines to print)`` of one of ``protocols``."""
        raise ValueError(f"data set {cls.name} has no evaluation protocol {protocol!r}"
                         + (f" (it has {', '.join(cls.protocols)})" if cls.protocols else ""))

    # ------------------------------------------------------------------ what a run is built from
    @classmethod
    def training_tasks(cls, config, train_set):
        d = config.data
        return EpisodeSampler(train_set, d.n_way, d.k_shot, d.k_query, d.task_batch, seed=config.training.seed,
                              augment=training_augmentation(d.augment, d.augment_strokes), group_by=d.group_by,
                              drawers=d.drawers)

    @classmethod
    def training_batches(cls, config, train_set, batch_size: int):
        """Labelled mini-batches of every training class (``ClassBatchSampler``), for learners
        trained by ordinary classification; augmented as the episodes would be."""
        return ClassBatchSampler(train_set, batch_size, seed=config.training.seed,
                                 augment=training_augmentation(config.data.augment, config.data.augment_strokes))

    @classmethod
    def fixed_tasks(cls, config, dataset, count: int, seed_offset: int):
        """``count`` fixed tasks of ``dataset`` in batches of ``eval_batch`` (the same on every call)."""
        d = config.data
        return first_tasks(EpisodeSampler(dataset, d.n_way, d.k_shot, d.k_query, min(d.eval_batch, count),
                                          seed=config.training.seed + seed_offset), count)

    @classmethod
    def build(cls, config, splits=("train", "val", "test"), class_batches: Optional[int] = None) -> dict:
        """The training task stream and the fixed validation and test tasks named in ``splits``;
        with ``class_batches``, training is labelled mini-batches of that size instead of episodes."""
        sets, out = cls.build_sets(config), {}
        if "train" in splits:
            out["train"] = (cls.training_tasks(config, sets[0]) if class_batches is None
                            else cls.training_batches(config, sets[0], class_batches))
        if "val" in splits:
            out["val"] = cls.fixed_tasks(config, sets[1], config.data.val_episodes, 1)
        if "test" in splits:
            out["test"] = cls.fixed_tasks(config, sets[2], config.data.test_episodes, 2)
        return out


def first_tasks(sampler, count: int):
    """The sampler's fixed meta-batches holding its first ``count`` tasks (the last one cut short)."""
    batch = sampler.batch_size
    episodes = sampler.fixed(math.ceil(count / batch))
    extra = len(episodes) * batch - count
    if extra:
        episodes[-1] = episodes[-1][: batch - extra]
    return episodes
