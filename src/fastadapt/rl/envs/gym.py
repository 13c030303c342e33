"""Task families on gymnasium environments, stepped with gymnasium's vector environments.

``GymTaskFamily`` is the interface for a user's own family: say how to make one environment
for a task (``make``, by default ``gymnasium.make(env_id)``), how to draw tasks
(``sample_tasks``), and, where the task changes only the reward, how to compute it from what
the environment reports (``task_reward``). ``make_env`` then builds one vector environment of
``tasks x trajectories`` copies, synchronous or with ``workers`` subprocesses. Actions are
clipped to a ``Box`` action space's bounds before stepping (the policy's log-probabilities are
of the unclipped sample, as usual). Needs ``pip install 'fastadapt[rl]'``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .base import TaskFamily

INSTALL = "pip install 'fastadapt[rl]'  (gymnasium with MuJoCo)"


def gymnasium():
    """The gymnasium module, or a one-line error naming the install command."""
    try:
        import gymnasium as gym
    except ImportError:
        raise RuntimeError(f"this environment needs gymnasium: {INSTALL}") from None
    _quiet_mujoco()
    return gym


_MUJOCO_SEEN: set = set()


def _quiet_mujoco() -> None:
    """MuJoCo prints each of its warnings for every model it compiles and appends them to
    MUJOCO_LOG.TXT in the working folder: gymnasium's HalfCheetah file draws a deprecation warning,
    so a meta-batch of 800 environments printed 800 lines and grew a log in the user's folder.
    Each distinct MuJoCo warning becomes one Python warning instead (unless the program installed
    its own handler)."""
    try:
        import mujoco
    except ImportError:
        return
    if mujoco.get_mju_user_warning() is not None:
        return

    def handler(message: str) -> None:
        if message not in _MUJOCO_SEEN:
            _MUJOCO_SEEN.add(message)
            warnings.warn(f"MuJoCo: {message}", stacklevel=2)

    mujoco.set_mju_user_warning(handler)


class GymTaskFamily(TaskFamily):
    """A family of tasks on one gymnasium environment id; subclasses set ``env_id`` and write
    ``sample_tasks`` and ``task_reward`` (or ``make``, for tasks that change the dynamics)."""

    env_id: str = ""
    env_kwargs: dict = {}

    def __init__(self, workers: int = 1):
        self.workers = int(workers)
        probe = self.make(None)
        space = probe.action_space
        gym = gymnasium()
        if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            self.action_dim, self.num_actions = int(space.shape[0]), None
            self.action_low, self.action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        elif isinstance(space, gym.spaces.Discrete):
            self.action_dim, self.num_actions = 1, int(space.n)
        else:
            raise ValueError(f"environment {self.env_id}: action space {space} is neither a flat Box (a Gaussian "
                             "policy) nor Discrete (a categorical policy); no policy here can serve it")
        shape = probe.observation_space.shape
        if shape is None or len(shape) != 1:
            raise ValueError(f"environment {self.env_id}: observations {probe.observation_space} are not a flat vector")
        self.observation_dim = int(shape[0])
        probe.close()

    def make(self, task):
        """One environment for ``task`` (None: any, to read the spaces)."""
        return gymnasium().make(self.env_id, **self.env_kwargs)

    def task_reward(self, tasks: np.ndarray, reward: np.ndarray, info: dict, actions: np.ndarray) -> np.ndarray:
        """Each copy's reward under its task (``tasks`` ``[E, P]``); by default the environment's."""
        return reward

    def make_env(self, tasks, trajectories, seed=0):
        return GymBatchEnv(self, tasks, trajectories, seed)


class GymBatchEnv:
    """``tasks x trajectories`` gymnasium environments in one vector environment."""

    def __init__(self, family: GymTaskFamily, tasks: torch.Tensor, trajectories: int, seed: int):
        gym = gymnasium()
        self.family, self.shape = family, (tasks.shape[0], trajectories)
        self.tasks = np.repeat(tasks.double().cpu().numpy(), trajectories, axis=0)
        makers = [functools.partial(family.make, task) for task in self.tasks]
        if family.workers > 1:
            self.env = gym.vector.AsyncVectorEnv(makers, context="fork")
        else:
            self.env = gym.vector.SyncVectorEnv(makers)
        self.seed = seed

    def reset(self) -> torch.Tensor:
        observations, _ = self.env.reset(seed=self.seed)
        return torch.as_tensor(observations, dtype=torch.float32).reshape(*self.shape, -1)

    def step(self, actions: torch.Tensor):
        flat = actions.detach().double().cpu().numpy().reshape(self.tasks.shape[0], -1)
        if self.family.num_actions is None:
            flat = np.clip(flat, self.family.action_low, self.family.action_high)
        else:
            flat = flat[:, 0].astype(np.int64)
        observations, reward, terminated, truncated, info = self.env.step(flat)
        reward = self.family.task_reward(self.tasks, reward, info, flat)
        done = np.logical_or(terminated, truncated)
        return (torch.as_tensor(observations, dtype=torch.float32).reshape(*self.shape, -1),
                torch.as_tensor(reward, dtype=torch.float32).reshape(self.shape),
                torch.as_tensor(done).reshape(self.shape))

    def close(self) -> None:
        self.env.close()


class HalfCheetahDirection(GymTaskFamily):
    """HalfCheetah-v5 running forward or backward (MAML paper, sec. 5.3): a task is a direction
    d in {-1, +1} (drawn with probability 1/2 each), the reward is d times the forward velocity
    minus gymnasium's control cost (0.1 |a|^2). The observation is gymnasium's 17 numbers (no x
    position). rllab's version, which the paper used, has a 20-number observation and its own
    model file; its returns are therefore not comparable number for number."""

    name = "halfcheetah-dir"
    summary = "HalfCheetah-v5 forward/backward (MAML paper sec. 5.3; needs fastadapt[rl])"
    env_id, horizon = "HalfCheetah-v5", 200

    def sample_tasks(self, count, generator):
        return (torch.randint(0, 2, (count, 1), generator=generator) * 2 - 1).double()

    def task_reward(self, tasks, reward, info, actions):
        return tasks[:, 0] * info["x_velocity"] + info["reward_ctrl"]


class HalfCheetahVelocity(GymTaskFamily):
    """HalfCheetah-v5 running at a goal velocity (MAML paper, sec. 5.3): a task is a velocity
    uniform in [0, 2], the reward is minus |forward velocity - goal| minus gymnasium's control
    cost (0.1 |a|^2). Observation and differences from rllab's version as ``halfcheetah-dir``."""

    name = "halfcheetah-vel"
    summary = "HalfCheetah-v5 at a goal velocity in [0, 2] (MAML paper sec. 5.3; needs fastadapt[rl])"
    env_id, horizon = "HalfCheetah-v5", 200

    def sample_tasks(self, count, generator):
        return torch.rand(count, 1, generator=generator, dtype=torch.float64) * 2.0

    def task_reward(self, tasks, reward, info, actions):
        return -np.abs(info["x_velocity"] - tasks[:, 0]) + info["reward_ctrl"]
