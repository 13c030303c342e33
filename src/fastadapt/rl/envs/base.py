"""Task families: what meta-RL samples tasks from, and the batched environments they make.

A ``TaskFamily`` (registered by ``name`` when its class is defined) does two things: draw task
parameters from a seeded generator (``sample_tasks``: ``[count, P]``, a goal position, a goal
velocity, a direction), and make one environment for a batch of tasks with ``trajectories``
parallel copies of each (``make_env``). The environment steps every copy of every task at once:
``reset()`` gives observations ``[T, N, obs]`` and ``step(actions [T, N, act])`` gives
``(observations, rewards [T, N], done [T, N])``. A trajectory that is done stays done; the
sampler masks what comes after. ``navigation-2d`` is written in tensors (a step is a few tensor
operations); the MuJoCo families wrap gymnasium's vector environments.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional

import torch

_FAMILIES: Dict[str, type] = {}


def families() -> Dict[str, type]:
    """Every registered task family, by name (the ``--env`` choices)."""
    return dict(_FAMILIES)


def family(name: str, **options) -> "TaskFamily":
    """The task family ``name``, built with ``options``; one line listing the names otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown environment {name!r}; the environments are {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name](**options)


class TaskFamily:
    """A distribution over tasks and the batched environments of its tasks."""

    name: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ""
    observation_dim: int
    action_dim: int                 # continuous actions: their dimension; discrete: 1 (the index)
    num_actions: Optional[int] = None  # discrete actions: how many; None for continuous ones
    horizon: int = 100               # the default trajectory length

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            taken = _FAMILIES.get(name)
            if taken is not None and taken.__qualname__ != cls.__qualname__:
                raise ValueError(f"environment name {name!r} is taken by {taken.__qualname__}")
            _FAMILIES[name] = cls

    def sample_tasks(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` tasks' parameters ``[count, P]``, drawn with ``generator``."""
        raise NotImplementedError

    def make_env(self, tasks: torch.Tensor, trajectories: int, seed: int = 0):
        """An environment stepping ``trajectories`` copies of each of ``tasks`` at once."""
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes or files the family holds; by default nothing."""
