"""Few-shot tasks as tensors with a leading task axis."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskBatch:
    """A meta-batch of T tasks of the same shape.

    ``support_x`` is ``[T, S, ...]`` and ``support_y`` ``[T, S]`` (class labels) or ``[T, S, D]``
    (regression targets); ``query_x`` / ``query_y`` likewise with Q examples per task.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self):
        sizes = {name: getattr(self, name).shape[0] if getattr(self, name).dim() else None
                 for name in ("support_x", "support_y", "query_x", "query_y")}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"TaskBatch: every tensor needs the same leading task axis, got {sizes}")
        for part in ("support", "query"):
            x, y = getattr(self, f"{part}_x"), getattr(self, f"{part}_y")
            if x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
                raise ValueError(f"TaskBatch: {part}_x {tuple(x.shape)} and {part}_y {tuple(y.shape)} "
                                 "must be [T, N, ...] with the same N")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Move to ``device``; ``dtype`` converts floating tensors only, never integer labels."""
        def move(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TaskBatch(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y))

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks (an int keeps the task axis, with length 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(self.support_x[index], self.support_y[index],
                         self.query_x[index], self.query_y[index])

    def split(self, chunk: int):
        """Consecutive sub-batches of at most ``chunk`` tasks."""
        for start in range(0, self.num_tasks, chunk):
            yield self[start:start + chunk]

    @staticmethod
    def cat(batches) -> "TaskBatch":
        batches = list(batches)
        return TaskBatch(*(torch.cat([getattr(b, f) for b in batches])
                           for f in ("support_x", "support_y", "query_x", "query_y")))


@dataclass
class ClassBatch:
    """A mini-batch for ordinary classification over all training classes (the pretrained
    baselines): ``images`` ``[N, ...]`` and ``labels`` ``[N]``, indices into the training set's
    classes. ``num_tasks`` is N, so the Trainer shares a batch among processes image by image as
    it shares a meta-batch task by task."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dim() < 2 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"ClassBatch: images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} "
                             "must be [N, ...] and [N]")

    @property
    def num_tasks(self) -> int:
        return self.images.shape[0]

    def to(self, device=None, dtype=None) -> "ClassBatch":
        return ClassBatch(self.images.to(device=device, dtype=dtype), self.labels.to(device=device))

    def __getitem__(self, index) -> "ClassBatch":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return ClassBatch(self.images[index], self.labels[index])
