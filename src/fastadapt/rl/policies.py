"""Policies as plain modules whose output is a distribution's parameters, with the few
distribution functions meta-RL needs written as pure functions of those outputs.

A policy's ``forward(observations)`` returns one tensor, so that it runs through
``torch.func.functional_call`` with per-task (adapted) weights like any network here, and the
MAML family's inner loops treat it as a model with a loss: ``GaussianMLPPolicy`` returns the
action mean and the (state-independent, learned) log standard deviation side by side,
``CategoricalMLPPolicy`` the logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..config import RLConfig

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _linear(params: dict, name: str, x: torch.Tensor, per_task: bool) -> torch.Tensor:
    """``x @ W^T + b`` with the weights ``params[name + ".weight"]``/``".bias"``; with
    ``per_task`` each task's own (a leading task axis on weights and ``x``), as one batched
    matrix product."""
    weight, bias = params[name + ".weight"], params[name + ".bias"]
    if not per_task:
        return torch.nn.functional.linear(x, weight, bias)
    shape = x.shape
    out = torch.baddbmm(bias[:, None, :], x.reshape(shape[0], -1, shape[-1]), weight.transpose(1, 2))
    return out.reshape(*shape[:-1], weight.shape[1])


def tanh(z: torch.Tensor) -> torch.Tensor:
    """``tanh(z)`` as ``2 sigmoid(2z) - 1``, overwriting ``z`` (no graph): the same function to
    float rounding, 2.7x faster than ``torch.tanh`` on this project's CPU build, whose sigmoid is
    vectorised and whose tanh is not (0.9 against 4.2 ns a value, one thread)."""
    return torch.sigmoid_(z.mul_(2)).mul_(2).sub_(1)


def mlp_outputs(body: nn.Sequential, head: str, params: dict, x: torch.Tensor, per_task: bool) -> torch.Tensor:
    """The output of ``body`` (Linear and stateless activations) then the Linear ``head``, with
    ``params`` named as the policy's ``named_parameters``: what ``functional_call`` computes, as
    plain matrix products. Sampling calls it once per time step, where ``functional_call`` (and
    ``vmap`` over per-task weights) cost more than the products themselves (measured in
    ``benchmarks/rl_navigation.py``). Without a graph, tanh is ``tanh`` above."""
    fast_tanh = not torch.is_grad_enabled()
    for index, module in enumerate(body):
        if isinstance(module, nn.Linear):
            x = _linear(params, f"body.{index}", x, per_task)
        else:
            x = tanh(x) if fast_tanh and index and type(module) is nn.Tanh else module(x)  # not the input
    return _linear(params, head, x, per_task)


def _body(inputs: int, hidden: Sequence[int], activation: str) -> nn.Sequential:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
    layers, width = [], inputs
    for size in hidden:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        width = size
    return nn.Sequential(*layers)


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian over continuous actions: an MLP gives the mean, and one learned
    log standard deviation per action dimension (independent of the state) the spread, as in the
    MAML paper (two hidden layers of 100 ReLU units there; 64x64 tanh in its 2D navigation
    reproduction). ``forward`` returns ``[..., 2 * action_dim]``: mean, then log std."""

    discrete = False

    def __init__(self, observation_dim: int, action_dim: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0):
        super().__init__()
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        self.observation_dim, self.action_dim = int(observation_dim), int(action_dim)
        self.body = _body(self.observation_dim, hidden, activation)
        self.mean = nn.Linear(hidden[-1] if hidden else self.observation_dim, self.action_dim)
        self.log_std = nn.Parameter(torch.full((self.action_dim,), math.log(init_std)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        mean = self.mean(self.body(observations))
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)

    def outputs(self, params: dict, observations: torch.Tensor, per_task: bool) -> torch.Tensor:
        """``forward`` with ``params`` (each task's own along a leading axis if ``per_task``)."""
        mean = mlp_outputs(self.body, "mean", params, observations, per_task)
        log_std = params["log_std"]
        log_std = log_std.reshape(log_std.shape[0], *[1] * (mean.dim() - 2), -1) if per_task else log_std
        return torch.cat([mean, log_std.expand_as(mean)], dim=-1)

    def split(self, out: torch.Tensor):
        return out[..., : self.action_dim], out[..., self.action_dim:]

    def noise(self, shape, generator=None, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise for ``sample``: ``[*shape, action_dim]``."""
        return torch.randn(*shape, self.action_dim, generator=generator, dtype=dtype)

    def sample(self, out: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """Actions for the outputs ``out``: ``mean + std * noise``, with ``noise`` from ``noise()``
        (drawn here from ``generator`` when not given)."""
        mean, log_std = self.split(out)
        if noise is None:
            noise = self.noise(mean.shape[:-1], generator, mean.dtype)
        return mean + log_std.exp() * noise.to(mean)

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-density of ``actions`` ``[..., A]``, summed over action dimensions: ``[...]``."""
        mean, log_std = self.split(out)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def kl(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """KL(old || new) per state, summed over action dimensions."""
        mean_old, log_std_old = self.split(old)
        mean_new, log_std_new = self.split(new)
        var_ratio = torch.exp(2 * (log_std_old - log_std_new))
        gap = (mean_old - mean_new) * torch.exp(-log_std_new)
        return (0.5 * (var_ratio + gap * gap - 1) - (log_std_old - log_std_new)).sum(-1)

    def kl_hessian_product(self, old: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``M u`` per state, with M the Hessian of ``kl(old, new)`` w.r.t. the output ``new`` at
        ``new = old``. It is diagonal: ``1 / std^2`` for each mean, 2 for each log std."""
        _, log_std = self.split(old)
        return torch.cat([torch.exp(-2 * log_std), torch.full_like(log_std, 2.0)], dim=-1) * u


class CategoricalMLPPolicy(nn.Module):
    """A categorical distribution over ``num_actions`` discrete actions: an MLP gives the logits.
    Actions are passed around as one float column (the action's index)."""

    discrete = True

    def __init__(self, observation_dim: int, num_actions: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu"):
        super().__init__()
        self.observation_dim, self.num_actions, self.action_dim = int(observation_dim), int(num_actions), 1
        self.body = _body(self.observation_dim, hidden, activation)
        self.logits = nn.Linear(hidden[-1] if hidden else self.observation_dim, self.num_actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.logits(self.body(observations))

    def outputs(self, params: dict, observations: torch.Tensor, per_task: bool) -> torch.Tensor:
        """``forward`` with ``params`` (each task's own along a leading axis if ``per_task``)."""
        return mlp_outputs(self.body, "logits", params, observations, per_task)

    def noise(self, shape, generator=None, dtype=torch.float32) -> torch.Tensor:
        """Uniform noise in [0, 1) for ``sample``: ``[*shape, 1]``."""
        return torch.rand(*shape, 1, generator=generator, dtype=dtype)

    def sample(self, out: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """Action indices for the logits ``out`` (one float column) by inverting the cumulative
        distribution at ``noise`` from ``noise()`` (drawn here from ``generator`` when not given)."""
        if noise is None:
            noise = self.noise(out.shape[:-1], generator, out.dtype)
        cumulative = out.softmax(-1).cumsum(-1)
        picks = (cumulative < noise.to(cumulative)).sum(-1, keepdim=True).clamp_max(out.shape[-1] - 1)
        return picks.to(out.dtype)

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return out.log_softmax(-1).gather(-1, actions.long()).squeeze(-1)

    def kl(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        old_log, new_log = old.log_softmax(-1), new.log_softmax(-1)
        return (old_log.exp() * (old_log - new_log)).sum(-1)

    def kl_hessian_product(self, old: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``M u`` per state, M = diag(p) - p p^T the Hessian of ``kl(old, new)`` w.r.t. the logits."""
        p = old.softmax(-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)


class PolicyGradientLoss:
    """The inner loop's loss for a policy: ``loss(policy_output, target)`` with ``target``
    ``[M, action_dim + 2]`` packing each step's action, advantage and weight (1 for a step of a
    trajectory, 0 for padding after it ended), a loss of the model's output and a target like any
    other, so every inner-loop rule of the MAML family applies to it.

    ``estimator="reinforce"``: minus the weighted mean of ``log pi(a | s) * advantage`` (REINFORCE
    with a baseline, as the MAML paper adapts). ``"lvc"``: the low-variance curvature estimator of
    ProMP (Rothfuss et al., ICLR 2019): ``pi(a | s) / stop_gradient(pi(a | s))`` in place of the
    log, a ratio whose value is 1 and whose gradient is the log's. Its gradient is
    REINFORCE's, so an inner step is the same; its Hessian adds ``sum c grad log pi grad log pi^T``
    (``c`` each step's weighted advantage), the part of the return's curvature that comes from the
    data's dependence on the policy that sampled it, which REINFORCE's Hessian leaves out. Second
    order, the meta-gradient through the adaptation then credits the pre-update sampling
    distribution, with the low variance of a score-function term per step rather than per
    trajectory."""

    __name__ = "policy_gradient"
    ESTIMATORS = RLConfig.INNER_ESTIMATORS

    def __init__(self, policy, estimator: str = "reinforce"):
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(self.ESTIMATORS)}, got {estimator!r}")
        self.policy, self.estimator = policy, estimator

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = self.policy.action_dim
        actions, advantages, weights = target[..., :a], target[..., a], target[..., a + 1]
        log_probs = self.policy.log_prob(out, actions)
        scores = torch.exp(log_probs - log_probs.detach()) if self.estimator == "lvc" else log_probs
        return -(scores * advantages * weights).sum() / weights.sum().clamp_min(1.0)
