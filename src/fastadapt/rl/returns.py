"""Returns, advantages and the linear feature baseline, batched over tasks and trajectories.

Every function takes ``[T, N, H]`` tensors (tasks, trajectories, time) with a ``mask`` that is 1
on the steps of a trajectory and 0 after it ended, so trajectories of different lengths share
one tensor.
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_k gamma^k r_{t+k}`` within each trajectory (0 after it ended)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        out[..., t] = running
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016): ``A_t = sum_k (gamma lam)^k delta_{t+k}``
    with ``delta_t = r_t + gamma V_{t+1} - V_t``; the value after a trajectory's last step is 0.
    ``lam = 1`` gives the discounted return minus the baseline."""
    next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (deltas[..., t] + gamma * lam * running) * mask[..., t]
        out[..., t] = running
    return out


def baseline_features(observations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The linear baseline's features of each step (Duan et al. 2016's rllab baseline): the
    observation clipped to [-10, 10], its square, the time step / 100 and its square and cube, 1."""
    obs = observations.clamp(-10, 10)
    time = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    time = time.expand(*obs.shape[:-1])[..., None]
    features = torch.cat([obs, obs * obs, time, time ** 2, time ** 3, torch.ones_like(time)], dim=-1)
    return features * mask[..., None]


def fit_linear_baseline(observations: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                        regularisation: float = 1e-5) -> torch.Tensor:
    """Each task's baseline values ``[T, N, H]``: ridge regression of the returns on
    ``baseline_features``, fitted per task over its trajectories' steps (``torch.linalg.solve`` on
    ``X^T X + reg I``; the regularisation grows tenfold, up to five times, while the system is
    singular)."""
    features = baseline_features(observations, mask)
    x = features.flatten(1, 2).double()                    # [T, N*H, F]
    y = (returns * mask).flatten(1, 2).double()[..., None]  # [T, N*H, 1]
    gram, target = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    reg = regularisation
    for _ in range(5):
        weights, info = torch.linalg.solve_ex(gram + reg * eye, target)
        if not info.any() and torch.isfinite(weights).all():
            break
        reg *= 10
    return (features.double() @ weights[:, None]).squeeze(-1).to(returns.dtype) * mask


def normalise(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages scaled to mean 0 and standard deviation 1 per task, over its valid steps."""
    count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    mean = (advantages * mask).sum(dim=(1, 2), keepdim=True) / count
    var = (((advantages - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / count
    return (advantages - mean) / (var.sqrt() + eps) * mask
