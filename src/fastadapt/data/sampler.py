"""N-way K-shot episodes drawn from a class-indexed image set, and plain labelled mini-batches
of it (for the pretrained baselines)."""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch

from .episodes import ClassBatch, TaskBatch

_TRAIN_STREAM, _FIXED_STREAM, _EPOCH_STREAM = 0, 1, 2


class IndexedStream(torch.utils.data.IterableDataset):
    """An endless stream whose item ``i`` is a pure function of ``(seed, i)`` (``item``).

    Iterating yields items ``start``, ``start + 1``, ... and advances ``start`` (``state_dict``
    resumes it exactly); in a ``DataLoader`` (``batch_size=None``) worker ``w`` of ``W`` yields
    ``start + w``, ``start + w + W``, ..., which the loader interleaves back into the same order."""

    seed: int
    start: int

    def item(self, index: int):
        raise NotImplementedError

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            while True:  # in-process: ``start`` tracks consumption, so state_dict() can resume
                item = self.item(self.start)
                self.start += 1
                yield item
        index = self.start + info.id
        while True:
            yield self.item(index)
            index += info.num_workers

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.start = int(state["seed"]), int(state["start"])


class EpisodeSampler(IndexedStream):
    """Meta-batches of few-shot classification tasks.

    Each task has ``n_way`` distinct classes and ``k_shot + k_query`` distinct images per class,
    so no image is both in the support and the query set. Labels are 0..n_way-1 assigned to the
    classes in a random order per task. Images become network input through the data set's
    ``to_tensor`` (its ``ImageTransform``; uint8 / 255 for a plain tensor set).

    Episode ``i`` is a pure function of ``(seed, i)``: iterating yields episodes ``start``,
    ``start + 1``, ... forever, on any machine, advancing ``start`` as it goes (``state_dict``); in a ``DataLoader`` (``batch_size=None``) worker
    ``w`` of ``W`` yields ``start + w``, ``start + w + W``, ..., which the loader interleaves back
    into the same order, so no episode repeats across workers. ``fixed(n)`` is a separate stream
    of ``n`` episodes, the same on every call (for evaluation).

    ``augment(images, generator)``, if given, maps the float images of one meta-batch
    ``[N, C, H, W]`` to new ones of the same shape, using the numpy ``generator`` for randomness.

    Lake et al.'s one-shot runs (Science 2015) use two more options, given as data (the sampler
    knows no data set). ``groups``, one group label per class, draws all classes of a task from
    one group (groups with fewer than ``n_way`` classes are left out). ``drawers``, one drawer id
    per image, takes each task's support images from ``k_shot`` drawers and its query images from
    ``k_query`` other drawers, the same drawers for every class, so no query is drawn by a hand
    seen in the support set. ``group_by="alphabet"`` and ``drawers="disjoint"`` are shorthands
    for the data set's own ``alphabets`` (per class) and ``drawers`` (per image), as Omniglot has.
    """

    def __init__(self, dataset, n_way: int, k_shot: int, k_query: int, batch_size: int, seed: int = 0,
                 augment: Optional[Callable] = None, group_by: Optional[str] = None,
                 drawers=None, groups=None):
        super().__init__()
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("k_query", k_query), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EpisodeSampler: {name} must be a positive integer, got {value!r}")
        if n_way > dataset.num_classes:
            raise ValueError(f"EpisodeSampler: n_way={n_way} is larger than the {dataset.num_classes} classes "
                             f"of {dataset!r}")
        sizes = [len(dataset.indices_of(c)) for c in range(dataset.num_classes)]
        smallest = int(np.argmin(sizes))
        if k_shot + k_query > sizes[smallest]:
            raise ValueError(f"EpisodeSampler: k_shot + k_query = {k_shot + k_query} is larger than class "
                             f"{dataset.class_names[smallest]!r}, which has {sizes[smallest]} images")
        self.dataset = dataset
        self.n_way, self.k_shot, self.k_query, self.batch_size = n_way, k_shot, k_query, batch_size
        self.seed = seed
        self.augment = augment
        self.start = 0
        self._class_indices = [dataset.indices_of(c).numpy() for c in range(dataset.num_classes)]
        if group_by is not None:
            if group_by != "alphabet":
                raise ValueError(f"EpisodeSampler: group_by must be None or 'alphabet', got {group_by!r}")
            groups = getattr(dataset, "alphabets", None)
            if groups is None:
                raise ValueError(f"EpisodeSampler: group_by='alphabet' needs a data set with alphabets (Omniglot); "
                                 f"{dataset!r} has none")
        if isinstance(drawers, str):
            if drawers != "disjoint":
                raise ValueError(f"EpisodeSampler: drawers must be None, 'disjoint' or one drawer per image, "
                                 f"got {drawers!r}")
            drawers = getattr(dataset, "drawers", None)
            if drawers is None or (torch.as_tensor(drawers) < 0).any():
                raise ValueError(f"EpisodeSampler: drawers='disjoint' needs the drawer of every image (Omniglot's "
                                 f"file names); {dataset!r} has none")
        self._groups = self._eligible_groups(dataset, groups, n_way, "alphabet" if group_by else "group")
        self._by_drawer = self._drawer_table(dataset, drawers, k_shot + k_query)

    def _eligible_groups(self, dataset, names, n_way, word):
        """The class indices of each group with at least ``n_way`` classes (None: no grouping)."""
        if names is None:
            return None
        if len(names) != dataset.num_classes:
            raise ValueError(f"EpisodeSampler: groups must give one group per class ({dataset.num_classes}), "
                             f"got {len(names)}")
        groups = {}
        for cls, name in enumerate(names):
            groups.setdefault(name, []).append(cls)
        eligible = [np.array(members) for _, members in sorted(groups.items()) if len(members) >= n_way]
        if not eligible:
            largest = max(groups.items(), key=lambda item: len(item[1]))
            raise ValueError(f"EpisodeSampler: no {word} has n_way={n_way} classes (the largest, "
                             f"{largest[0]!r}, has {len(largest[1])})")
        return eligible

    def _drawer_table(self, dataset, drawers, per_class):
        """``[classes, drawers]`` image indices (None: drawers not used)."""
        if drawers is None:
            return None
        of_image = torch.as_tensor(drawers).numpy()
        if of_image.shape != (len(dataset.images),):
            raise ValueError(f"EpisodeSampler: drawers must give one drawer per image ({len(dataset.images)}), "
                             f"got shape {tuple(of_image.shape)}")
        self._drawer_ids = np.unique(of_image)
        table = np.full((dataset.num_classes, len(self._drawer_ids)), -1, dtype=np.int64)
        position = {d: i for i, d in enumerate(self._drawer_ids.tolist())}
        for cls, members in enumerate(self._class_indices):
            for index in members:
                table[cls, position[int(of_image[index])]] = index
        missing = np.argwhere(table < 0)
        if len(missing):
            cls, column = missing[0]
            raise ValueError(f"EpisodeSampler: drawers='disjoint' needs every class drawn by the same drawers; "
                             f"{dataset.class_names[cls]!r} has no image by drawer {self._drawer_ids[column]}")
        if per_class > len(self._drawer_ids):
            raise ValueError(f"EpisodeSampler: k_shot + k_query = {per_class} drawers are needed, there are "
                             f"{len(self._drawer_ids)}")
        return table

    def episode_indices(self, index: int, stream: int = _TRAIN_STREAM):
        """Which images make episode ``index``: ``picks`` ``[T, n_way, k_shot + k_query]`` indices
        into the data set (support first) and ``labels`` ``[T, n_way]``, the label of each slot's
        class, with the generator that drew them (``episode`` goes on using it)."""
        rng = np.random.default_rng([self.seed, stream, index])
        per_class = self.k_shot + self.k_query
        picks = np.empty((self.batch_size, self.n_way, per_class), dtype=np.int64)
        labels = np.empty((self.batch_size, self.n_way), dtype=np.int64)
        for task in range(self.batch_size):
            if self._groups is None:
                classes = rng.choice(len(self._class_indices), self.n_way, replace=False)
            else:
                group = self._groups[rng.integers(len(self._groups))]
                classes = group[rng.choice(len(group), self.n_way, replace=False)]
            if self._by_drawer is None:
                for slot, cls in enumerate(classes):
                    members = self._class_indices[cls]
                    picks[task, slot] = members[rng.choice(len(members), per_class, replace=False)]
            else:  # support drawers first, then the query drawers: the same for every class
                chosen = rng.choice(self._by_drawer.shape[1], per_class, replace=False)
                picks[task] = self._by_drawer[classes][:, chosen]
            labels[task] = rng.permutation(self.n_way)
        return picks, labels, rng

    def episode(self, index: int, stream: int = _TRAIN_STREAM) -> TaskBatch:
        picks, labels, rng = self.episode_indices(index, stream)
        per_class = self.k_shot + self.k_query
        images = self.dataset.images[torch.from_numpy(picks.reshape(-1))]
        images = self.dataset.to_tensor(images) if hasattr(self.dataset, "to_tensor") else images.float().div_(255)
        if self.augment is not None:
            images = self.augment(images, rng)
        images = images.reshape(self.batch_size, self.n_way, per_class, *images.shape[1:])
        labels = torch.from_numpy(labels)[:, :, None]
        k, shape = self.k_shot, images.shape[3:]
        return TaskBatch(
            support_x=images[:, :, :k].reshape(self.batch_size, self.n_way * k, *shape),
            support_y=labels.expand(-1, -1, k).reshape(self.batch_size, -1),
            query_x=images[:, :, k:].reshape(self.batch_size, self.n_way * self.k_query, *shape),
            query_y=labels.expand(-1, -1, self.k_query).reshape(self.batch_size, -1),
        )

    def item(self, index: int) -> TaskBatch:
        return self.episode(index)

    def fixed(self, episodes: int) -> List[TaskBatch]:
        """``episodes`` meta-batches from a stream separate from training, the same every call."""
        if episodes <= 0:
            raise ValueError(f"EpisodeSampler.fixed: episodes must be positive, got {episodes}")
        return [self.episode(i, _FIXED_STREAM) for i in range(episodes)]

    def fixed_indices(self, episode: int):
        """``(picks, labels)`` of ``fixed()``'s meta-batch ``episode``, as ``episode_indices`` gives them:
        which images (``dataset.sources`` names their files) and labels evaluation uses."""
        picks, labels, _ = self.episode_indices(episode, _FIXED_STREAM)
        return picks, labels


class ClassBatchSampler(IndexedStream):
    """Mini-batches of ``batch_size`` labelled images of ``dataset`` for ordinary classification
    over all its classes (``ClassBatch``: labels are the set's class indices).

    Epoch ``e`` visits every image once in an order drawn from ``(seed, e)``, and batch ``i``
    holds images ``i * batch_size ...`` of that sequence of epochs (a batch may span two), so
    batch ``i`` is a pure function of ``(seed, i)``: iteration resumes from ``state_dict`` exactly,
    and in a ``DataLoader`` worker ``w`` of ``W`` yields batches ``start + w``, ``start + w + W``, ...
    Images become network input through the set's ``to_tensor``; ``augment(images, generator)``
    as in ``EpisodeSampler``."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, augment: Optional[Callable] = None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"ClassBatchSampler: batch_size must be a positive integer, got {batch_size!r}")
        if len(dataset.images) == 0:
            raise ValueError(f"ClassBatchSampler: {dataset!r} has no images")
        self.dataset, self.batch_size, self.seed, self.augment = dataset, batch_size, seed, augment
        self.start = 0
        self._orders: dict = {}

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(len(self.dataset.images))
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return order

    def batch_indices(self, index: int) -> np.ndarray:
        """The images (indices into the set) of batch ``index``."""
        size = len(self.dataset.images)
        first = index * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        epochs = positions // size
        return np.concatenate([self._order(int(e))[positions[epochs == e] % size] for e in np.unique(epochs)])

    def batch(self, index: int) -> ClassBatch:
        picks = torch.from_numpy(self.batch_indices(index))
        images = self.dataset.images[picks]
        images = self.dataset.to_tensor(images) if hasattr(self.dataset, "to_tensor") else images.float().div_(255)
        if self.augment is not None:
            images = self.augment(images, np.random.default_rng([self.seed, _TRAIN_STREAM, index]))
        return ClassBatch(images, self.dataset.targets[picks])

    def item(self, index: int) -> ClassBatch:
        return self.batch(index)
