"""Trajectories of a batch of tasks, each acting with its own (adapted) policy weights.

``sample`` steps every copy of every task together: one policy forward per time step for the
whole ``[T, N]`` batch (batched matrix products when each task has its own weights, a leading
task axis, as ``MetaLearner.adapt`` returns them), then one environment step. A trajectory that
ends is masked from then on; sampling stops when every trajectory has ended or at ``horizon``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap


@dataclass
class Trajectories:
    """``observations`` ``[T, N, H, obs]``, ``actions`` ``[T, N, H, act]``, ``rewards`` and ``mask``
    ``[T, N, H]`` (1 on a trajectory's steps, 0 after it ended)."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor

    def task_returns(self) -> torch.Tensor:
        """Each task's mean undiscounted return over its trajectories: ``[T]``."""
        return (self.rewards * self.mask).sum(-1).mean(-1)

    def tasks(self, part: slice) -> "Trajectories":
        """The trajectories of the tasks in ``part``."""
        return Trajectories(*(t[part] for t in (self.observations, self.actions, self.rewards, self.mask)))

    def subset(self, trajectories: int) -> "Trajectories":
        """The first ``trajectories`` of each task's."""
        return Trajectories(*(t[:, :trajectories] for t in (self.observations, self.actions, self.rewards,
                                                             self.mask)))


def policy_outputs(policy, params: dict, observations: torch.Tensor, per_task: bool) -> torch.Tensor:
    """The policy's outputs on ``observations`` ``[T, ...]`` with ``params``: one set of weights for
    every task, or (``per_task``) each task's own along a leading task axis. A policy with an
    ``outputs(params, observations, per_task)`` method computes them itself (this package's MLP
    policies, as batched matrix products); any other through ``functional_call``."""
    if hasattr(policy, "outputs"):
        return policy.outputs(params, observations, per_task)
    if not per_task:
        return functional_call(policy, params, (observations,))
    return vmap(lambda p, o: functional_call(policy, p, (o,)), randomness="different")(params, observations)


@torch.no_grad()
def sample(env, policy, params: dict, horizon: int, generators, per_task: bool) -> Trajectories:
    """``horizon`` steps (or until every trajectory ended) of ``env`` acting with ``policy``.

    ``generators``: one ``torch.Generator`` per task, from which that task's action noise for the
    whole horizon is drawn first, so a task's trajectories do not depend on which other tasks are
    sampled beside it (a process of a distributed run samples its share of the tasks alike)."""
    dtype = next(iter(params.values())).dtype
    obs = env.reset().to(dtype)
    trajectories = obs.shape[1]
    noise = torch.stack([policy.noise((horizon, trajectories), g, dtype) for g in generators], dim=1)
    alive = torch.ones(obs.shape[:2], dtype=dtype)
    observations, actions, rewards, masks = [], [], [], []
    for step in range(horizon):
        action = policy.sample(policy_outputs(policy, params, obs, per_task), noise=noise[step])
        next_obs, reward, done = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward.to(dtype) * alive)
        masks.append(alive)
        alive = alive * (~done).to(dtype)
        if not alive.any():
            break
        obs = next_obs.to(dtype)
    return Trajectories(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2),
                        torch.stack(masks, 2))
