"""2D navigation (Finn, Abbeel and Levine, ICML 2017, sec. 5.3): a point moves to a goal."""

from __future__ import annotations

import torch

from .base import TaskFamily


class Navigation2D(TaskFamily):
    """A point starts at the origin; its action is its velocity, clipped to [-0.1, 0.1] in each
    coordinate; the reward of a step is minus the L2 distance to the goal after it; a trajectory
    ends when both coordinates are within 0.01 of the goal or after ``horizon`` steps. Goals are
    uniform in [-0.5, 0.5]^2. The observation is the position. As the MAML paper's rllab
    version, except that it is written in tensors batched over tasks and trajectories."""

    name = "navigation-2d"
    summary = "2D navigation to a goal in [-0.5, 0.5]^2 (MAML paper, sec. 5.3), batched tensors"
    observation_dim, action_dim, horizon = 2, 2, 100
    goal_range, speed, tolerance = 0.5, 0.1, 0.01

    def sample_tasks(self, count, generator):
        return (torch.rand(count, 2, generator=generator, dtype=torch.float64) * 2 - 1) * self.goal_range

    def make_env(self, tasks, trajectories, seed=0):
        return NavigationEnv(tasks, trajectories, self.speed, self.tolerance)


class NavigationEnv:
    """``trajectories`` points per goal of ``goals`` ``[T, 2]``, stepped together."""

    def __init__(self, goals: torch.Tensor, trajectories: int, speed: float, tolerance: float):
        self.goals = goals.float()[:, None, :]
        self.trajectories, self.speed, self.tolerance = trajectories, speed, tolerance
        self.position = None

    def reset(self) -> torch.Tensor:
        self.position = torch.zeros(self.goals.shape[0], self.trajectories, 2, dtype=self.goals.dtype,
                                    device=self.goals.device)
        return self.position.clone()

    def step(self, actions: torch.Tensor):
        self.position = self.position + actions.to(self.position).clamp(-self.speed, self.speed)
        offset = self.position - self.goals
        reward = -offset.norm(dim=-1)
        done = (offset.abs() < self.tolerance).all(dim=-1)
        return self.position.clone(), reward, done

    def close(self) -> None:
        pass
