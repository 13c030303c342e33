"""The Gaussian MLP policy's adaptation and its derivatives written out as matrix products.

MAML-RL's TRPO step differentiates through the inner step three ways: the meta-gradient (a
vector-Jacobian product through the adaptation), ten curvature products (a Jacobian-vector and a
vector-Jacobian product each) and the line search's re-adaptations. Autograd records the inner
gradient as a graph and differentiates that graph again, which costs about 1.5 times the time
of the products themselves (one curvature product on a fifth of issue 20's navigation batch:
35 ms by graph, 24 ms here; docs/performance.md).
For the policy that nearly every run uses (``GaussianMLPPolicy``: Linear layers with tanh or
ReLU between them, a state-independent log std) and the inner loss of the paper (REINFORCE,
``PolicyGradientLoss("reinforce")``), this module computes the same quantities with explicit
products: a forward pass that keeps what its derivatives need, its tangent (forward mode), its
backward pass, and the inner loss's Hessian-vector product in forward-over-reverse form. Each
inner step is ``params - rate * grad`` as ``MAML`` (one rate) and ``MetaSGD`` (a learned rate per
weight) take it. ``MAMLTRPO`` uses it where it applies and autograd elsewhere; tests hold the two
equal in float64.

Parameters and vectors are dicts keyed by the policy's parameter names, each value with a
leading task axis (or without one, meaning the same for every task).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .policies import GaussianMLPPolicy, tanh


def supports(policy, estimator: str) -> bool:
    """Whether the explicit derivatives cover this policy and inner loss: a ``GaussianMLPPolicy``
    (not a subclass) whose body alternates Linear layers and one kind of activation, tanh or
    ReLU, as ``GaussianMLPPolicy`` builds it, with the REINFORCE inner loss."""
    if type(policy) is not GaussianMLPPolicy or estimator != "reinforce":
        return False
    body = list(policy.body)
    activations = {type(m) for m in body[1::2]}
    return (all(type(m) is nn.Linear for m in body[0::2]) and len(body) % 2 == 0
            and (activations <= {nn.Tanh} or activations <= {nn.ReLU}))


def _batched(tensor: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    return tensor if tensor.dim() > dims else tensor.expand(tasks, *tensor.shape)


def _outer(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``sum_r grad_r inputs_r^T`` per task, ``[T, out, in]``: a weight's gradient. With few
    inputs (an observation of 2 numbers) the product is taken the other way round and transposed,
    6x faster than MKL's batched product in the direct order."""
    if inputs.shape[-1] < grad.shape[-1]:
        return torch.bmm(inputs.transpose(1, 2), grad).transpose(1, 2)
    return torch.bmm(grad.transpose(1, 2), inputs)


class MLPPass:
    """The mean network's forward pass on ``x`` ``[T, R, obs]`` with per-task weights, keeping
    each layer's input and its activation's first and (``curvature``: for Hessian-vector
    products) second derivatives."""

    def __init__(self, policy: GaussianMLPPolicy, params: dict, x: torch.Tensor, curvature: bool = True):
        self.names = [f"body.{i}" for i, m in enumerate(policy.body) if isinstance(m, nn.Linear)] + ["mean"]
        self.relu = any(isinstance(m, nn.ReLU) for m in policy.body)
        tasks = x.shape[0]
        self.weights = [_batched(params[n + ".weight"], tasks, 2) for n in self.names]
        biases = [_batched(params[n + ".bias"], tasks, 1) for n in self.names]
        self.inputs, self.slopes, self.curvatures = [x], [], []
        h = x
        for layer, (weight, bias) in enumerate(zip(self.weights, biases)):
            z = torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))
            if layer == len(self.weights) - 1:
                self.mean = z
                break
            if self.relu:
                slope = (z > 0).to(z.dtype)
                h = z * slope
                self.curvatures.append(None)
            else:
                h = tanh(z)
                slope = 1 - h * h
                self.curvatures.append(-2 * h * slope if curvature else None)
            self.slopes.append(slope)
            self.inputs.append(h)

    def outputs(self, log_std: torch.Tensor) -> torch.Tensor:
        """The policy's outputs (``GaussianMLPPolicy.forward``): the mean, then each task's log std
        (``[T, act]``) on every row."""
        return torch.cat([self.mean, log_std[:, None, :].expand_as(self.mean)], dim=-1)

    def tangent(self, vector: dict) -> tuple:
        """Each layer's pre-activation tangent for the weight tangent ``vector`` (the last: the
        mean's), and each hidden layer's output tangent."""
        tasks, tangents, hidden, dh = self.inputs[0].shape[0], [], [], None
        for layer, (name, weight) in enumerate(zip(self.names, self.weights)):
            dweight = _batched(vector[name + ".weight"], tasks, 2)
            dbias = _batched(vector[name + ".bias"], tasks, 1)
            dz = torch.baddbmm(dbias[:, None, :], self.inputs[layer], dweight.transpose(1, 2))
            if dh is not None:
                dz = dz.baddbmm(dh, weight.transpose(1, 2))
            tangents.append(dz)
            if layer < len(self.weights) - 1:
                dh = self.slopes[layer] * dz
                hidden.append(dh)
        return tangents, hidden

    def backward(self, grad_mean: torch.Tensor) -> tuple:
        """Per-task gradients of the weights for ``grad_mean`` (d/d mean, ``[T, R, act]``), and
        each layer's output gradient and hidden-input gradient (for ``hessian_vector``)."""
        layers = len(self.weights)
        grads, out_grads, in_grads = {}, [None] * layers, [None] * layers
        gz = grad_mean
        for layer in range(layers - 1, -1, -1):
            name = self.names[layer]
            out_grads[layer] = gz
            grads[name + ".weight"] = _outer(gz, self.inputs[layer])
            grads[name + ".bias"] = gz.sum(1)
            if layer:
                in_grads[layer] = torch.bmm(gz, self.weights[layer])
                gz = in_grads[layer] * self.slopes[layer - 1]
        return grads, out_grads, in_grads


def score_gradients(residual, inv_var, weight, log_std_terms):
    """d/d mean and d/d log std of ``-sum_r weight_r log pi(a_r | s_r)`` for a diagonal Gaussian
    (``residual = a - mean``, ``inv_var = exp(-2 log std)``)."""
    grad_mean = -weight * residual * inv_var
    grad_log_std = -(log_std_terms * inv_var[:, 0]) + weight.sum(1)
    return grad_mean, grad_log_std


class InnerStep:
    """The REINFORCE inner loss of one step at ``params`` on support data (``observations``
    ``[T, R, obs]``, ``target`` ``[T, R, act + 2]`` as ``PolicyGradientLoss`` takes it): its
    gradient, and (``curvature``) its Hessian's product with a vector."""

    def __init__(self, policy: GaussianMLPPolicy, params: dict, observations, target, curvature: bool = True):
        act = policy.action_dim
        self.with_curvature = curvature
        self.net = MLPPass(policy, params, observations, curvature)
        mask = target[..., act + 1]
        self.weight = (target[..., act] * mask / mask.sum(1, keepdim=True).clamp_min(1))[..., None]
        log_std = _batched(params["log_std"], observations.shape[0], 1)
        self.inv_var = torch.exp(-2 * log_std)[:, None, :]
        self.residual = target[..., :act] - self.net.mean
        self.weighted_residual = self.weight * self.residual
        self.log_std_terms = (self.weighted_residual * self.residual).sum(1)
        grad_mean, grad_log_std = score_gradients(self.residual, self.inv_var, self.weight, self.log_std_terms)
        self.grad, self.out_grads, in_grads = self.net.backward(grad_mean)
        self.grad["log_std"] = grad_log_std
        # the activation's curvature times the gradient reaching it: constant across products
        self.curved = [None] + [None if c is None else g * c for g, c in zip(in_grads[1:], self.net.curvatures)]
        self.net.curvatures = None

    def hessian_vector(self, vector: dict) -> dict:
        """``H v`` per task, H the loss's Hessian at ``params`` (forward over reverse)."""
        if not self.with_curvature:
            raise RuntimeError("this InnerStep kept no second derivatives (curvature=False)")
        net = self.net
        tangents, hidden = net.tangent(vector)
        dmean = tangents[-1]
        tasks = dmean.shape[0]
        dlog_std = _batched(vector["log_std"], tasks, 1)
        dgz = self.weight * self.inv_var * (dmean + 2 * self.residual * dlog_std[:, None, :])
        out = {"log_std": 2 * self.inv_var[:, 0] * ((self.weighted_residual * dmean).sum(1)
                                                     + dlog_std * self.log_std_terms)}
        for layer in range(len(net.weights) - 1, -1, -1):
            name = net.names[layer]
            dweight = _outer(dgz, net.inputs[layer])
            out[name + ".bias"] = dgz.sum(1)
            if layer:
                out[name + ".weight"] = dweight + _outer(self.out_grads[layer], hidden[layer - 1])
                dgh = torch.bmm(dgz, net.weights[layer]).baddbmm(
                    self.out_grads[layer], _batched(vector[name + ".weight"], tasks, 2))
                dgz = dgh * net.slopes[layer - 1]
                if self.curved[layer] is not None:
                    dgz = dgz.addcmul_(self.curved[layer], tangents[layer - 1])
            else:
                out[name + ".weight"] = dweight
        return out


class Adaptation:
    """The inner steps of every task from the meta-parameters ``params`` (shared), one per
    support set added with ``step``: ``fast``, the adapted weights; ``tangent``, the adapted
    weights' tangent for a tangent of the meta-parameters (and of the rates); ``transpose``, the
    gradient w.r.t. the meta-parameters (and the rates) of a gradient w.r.t. the adapted weights.
    ``rates``: one float (MAML) or a dict like ``params`` (Meta-SGD's learned rates);
    ``first_order``: the inner gradients are constants (their Hessian is left out); ``keep=False``:
    the adapted weights only (nothing kept to differentiate)."""

    def __init__(self, policy: GaussianMLPPolicy, params: dict, rates, first_order: bool, keep: bool = True):
        self.policy, self.rates, self.first_order, self.keep = policy, rates, first_order, keep
        self.fast, self.steps = params, []

    def _rate(self, name: str):
        return self.rates[name] if isinstance(self.rates, dict) else self.rates

    def step(self, observations, target) -> dict:
        step = InnerStep(self.policy, self.fast, observations, target, self.keep and not self.first_order)
        if self.keep:
            self.steps.append(step)
        self.fast = {name: value - self._rate(name) * step.grad[name] for name, value in self.fast.items()}
        return self.fast

    def tangent(self, vector: dict, rate_vector: Optional[dict] = None) -> dict:
        for step in self.steps:
            curvature = None if self.first_order else step.hessian_vector(vector)
            new = {}
            for name, value in vector.items():
                if curvature is not None:
                    value = value - self._rate(name) * curvature[name]
                if rate_vector is not None:
                    value = value - rate_vector[name] * step.grad[name]
                new[name] = value
            vector = new
        return vector

    def transpose(self, grad: dict) -> tuple:
        """(gradient w.r.t. the meta-parameters, w.r.t. the rates or None), summed over tasks."""
        rate_grad = {name: 0 for name in grad} if isinstance(self.rates, dict) else None
        for step in reversed(self.steps):
            if rate_grad is not None:
                rate_grad = {name: rate_grad[name] - (step.grad[name] * grad[name]).sum(0) for name in grad}
            if not self.first_order:
                curvature = step.hessian_vector({name: self._rate(name) * value for name, value in grad.items()})
                grad = {name: value - curvature[name] for name, value in grad.items()}
        return {name: value.sum(0) for name, value in grad.items()}, rate_grad
