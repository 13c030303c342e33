"""MAML-RL (Finn, Abbeel and Levine, ICML 2017, sec. 5.3 and app. A.2) on the shared engine.

Each task adapts the policy with ``inner_steps`` policy-gradient steps, each on trajectories
sampled with the policy as adapted so far. The step itself is the inner-loop rule of a MAML-family
learner (``MAML``, or ``MetaSGD``'s learned rates) applied to ``PolicyGradientLoss``, vmapped over
tasks, second order unless ``first_order``. The outer step scores each task's query trajectories,
sampled with its adapted policy, by the importance-weighted surrogate and updates the initial
policy with TRPO (Schulman et al. 2015) as the paper does: the mean KL's Hessian-vector products
are taken through the adaptation, conjugate gradient solves for the natural direction, and a
backtracking line search keeps the mean KL under ``max_kl`` while the surrogate improves. The
alternative ``outer="ppo"`` takes clipped-surrogate Adam steps instead (first order in the outer
step's curvature; still through the adaptation).

The Hessian-vector products are exact and cheap: at the current policy the KL's Hessian is
``J^T M J`` (``kl_hvp``), whose graphs are built once per iteration, so a product is a
Jacobian-vector and a vector-Jacobian product with no third derivative of the inner loss
(``hvp_fraction`` < 1 builds them on that share of each task's trajectories, a common TRPO
option). Sampling adds no graph: trajectories are constants of the meta-gradient, as in the
paper (not the DiCE / ProMP estimator). For ``GaussianMLPPolicy`` with the REINFORCE inner loss
the meta-gradient, the products and the line search's re-adaptations are explicit matrix
products (``rl/explicit.py``, about half the operations); autograd's graphs serve every other
policy and loss, and are the reference the tests hold the explicit ones to (``explicit=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import vmap

from .. import distributed
from ..algorithms import MAML, MetaSGD
from ..algorithms.functional import detach
from . import explicit
from . import returns as R
from .allocator import keep_freed_memory
from .policies import PolicyGradientLoss
from .sampling import Trajectories, policy_outputs, sample

RULES = {"maml": MAML, "metasgd": MetaSGD}


@dataclass
class RLOutput:
    """What one meta-iteration or evaluation produced. ``loss``: the outer surrogate before the
    update (training) or minus the mean return after adapting (evaluation); ``returns``: mean return
    per task ``[T, steps + 1]``, before adapting, then after each step; ``kl``: the mean KL of
    the accepted outer step (training); ``accepted``: whether the line search found a step."""

    loss: torch.Tensor
    returns: torch.Tensor
    kl: Optional[float] = None
    accepted: Optional[bool] = None

    @property
    def query_loss(self) -> torch.Tensor:
        return -self.returns.mean(0)

    @property
    def query_accuracy(self):
        return None

    @property
    def task_loss(self) -> torch.Tensor:
        return -self.returns

    @property
    def task_accuracy(self):
        return None

    @property
    def task_return(self) -> torch.Tensor:
        return self.returns


class MAMLTRPO(nn.Module):
    """MAML-RL on a task family (``rl.envs``) with a policy (``rl.policies``).

    ``inner_lr``/``inner_steps``: the adaptation (the paper: one step at 0.1); ``rule``: ``"maml"``
    or ``"metasgd"``; ``trajectories`` per task and ``horizon`` per trajectory, for the support and
    the query sets alike; ``inner_estimator``: the inner loss, ``"reinforce"`` (the paper's) or ProMP's
    ``"lvc"`` (``PolicyGradientLoss``: the same inner steps, a different meta-gradient); ``gamma``/``gae_lambda``: returns and GAE with the linear feature baseline
    refitted per task, advantages normalised per task; ``task_chunk``: tasks per chunk of the outer
    step ("auto": by time steps, see ``_parts``; None: all at once; results do not depend on it); TRPO: ``max_kl``, ``cg_iters``, ``cg_damping``,
    ``ls_steps``, ``ls_ratio``; PPO: ``ppo_clip``, ``ppo_epochs`` with the optimiser
    ``make_optimizer`` gives (Adam at ``meta_lr``). At test time the steps after the first take half
    the rate (the paper's app. A.2: halving it after the first step did better).
    """

    CHUNK_ROWS = 10_000  # time steps per chunk of the outer step under task_chunk="auto"

    def __init__(self, policy: nn.Module, family, inner_lr: float = 0.1, inner_steps: int = 1,
                 first_order: bool = False, rule: str = "maml", trajectories: int = 20, horizon: Optional[int] = None,
                 gamma: float = 0.99, gae_lambda: float = 1.0, outer: str = "trpo", max_kl: float = 0.01,
                 cg_iters: int = 10, cg_damping: float = 1e-5, ls_steps: int = 15, ls_ratio: float = 0.8,
                 hvp_fraction: float = 1.0, ppo_clip: float = 0.2, ppo_epochs: int = 5, seed: int = 0,
                 task_chunk="auto", inner_estimator: str = "reinforce"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if outer not in ("trpo", "ppo"):
            raise ValueError(f"outer must be 'trpo' or 'ppo', got {outer!r}")
        if not 0 < hvp_fraction <= 1:
            raise ValueError(f"hvp_fraction must be in (0, 1], got {hvp_fraction!r}")
        if not (task_chunk in (None, "auto") or isinstance(task_chunk, int) and not isinstance(task_chunk, bool)
                and task_chunk > 0):
            raise ValueError(f"task_chunk must be 'auto', None or a positive integer, got {task_chunk!r}")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        if family.num_actions is not None and not getattr(policy, "discrete", False) or \
                family.num_actions is None and getattr(policy, "discrete", False):
            kind = "discrete" if family.num_actions is not None else "continuous"
            raise ValueError(f"environment {family.name}: its actions are {kind}, which {type(policy).__name__} "
                             "cannot serve (Gaussian policies: continuous; categorical: discrete)")
        self.policy, self.family = policy, family
        self.learner = RULES[rule](policy, inner_lr, inner_steps, first_order=first_order,
                                   loss=PolicyGradientLoss(policy, inner_estimator), classification=False, task_chunk=None)
        self.rule, self.inner_lr, self.inner_steps, self.first_order = rule, float(inner_lr), inner_steps, first_order
        self.trajectories, self.horizon = int(trajectories), int(horizon or family.horizon)
        self.gamma, self.gae_lambda, self.outer = float(gamma), float(gae_lambda), outer
        self.max_kl, self.cg_iters, self.cg_damping = float(max_kl), int(cg_iters), float(cg_damping)
        self.ls_steps, self.ls_ratio, self.hvp_fraction = int(ls_steps), float(ls_ratio), float(hvp_fraction)
        self.ppo_clip, self.ppo_epochs, self.seed = float(ppo_clip), int(ppo_epochs), int(seed)
        self.task_chunk, self.inner_estimator = task_chunk, inner_estimator
        self.iteration = 0
        self.explicit = explicit.supports(policy, inner_estimator)
        keep_freed_memory()  # rl/allocator.py: the iteration's large temporaries reuse the process's pages

    @property
    def explicit(self) -> bool:
        """Whether the adaptation's derivatives are explicit products (``rl/explicit.py``, the
        default where they apply) or autograd's graphs (``False``: the reference the tests hold
        them to)."""
        return self._explicit

    @explicit.setter
    def explicit(self, value: bool) -> None:
        if value and not explicit.supports(self.policy, self.inner_estimator):
            raise ValueError(f"explicit derivatives are written for GaussianMLPPolicy with the reinforce inner loss, "
                             f"not {type(self.policy).__name__} with {self.inner_estimator!r}")
        self._explicit = bool(value)

    # ------------------------------------------------------------------ the Trainer's interface
    @classmethod
    def accepted_options(cls):
        return ()

    def on_step(self, iteration: int) -> None:
        self.iteration = iteration

    def make_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        """Adam at ``meta_lr`` for ``outer="ppo"``; for TRPO, plain SGD at rate 1 through which the
        accepted step (written into ``.grad``) is applied, so checkpoints and schedules see one."""
        if self.outer == "ppo":
            return torch.optim.Adam(self.parameters(), lr=meta_lr)
        return torch.optim.SGD(self.parameters(), lr=1.0)

    # ------------------------------------------------------------------ data
    def _generators(self, tasks: torch.Tensor, first: int, step: int, test: bool) -> list:
        """One generator of action noise per task for one sampling phase, from the seed, the task's
        parameters and its place ``first + i`` in the meta-batch, the phase and (in training) the
        iteration: a run and its resumed copy sample alike, evaluation is the same each time, and a
        process of a distributed run draws for its tasks what one process would."""
        iteration = -1 if test else self.iteration
        values = torch.as_tensor(tasks).double().reshape(tasks.shape[0], -1)
        keys = values.abs().sum(1).mul(1e6).round().long().remainder(1_000_003).tolist()
        return [torch.Generator().manual_seed(((((self.seed * 1_000_003 + key) * 100_003 + iteration) * 101 + step)
                                               * 10_007 + first + i) % (2 ** 63))
                for i, key in enumerate(keys)]

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        """GAE over the linear baseline fitted to this task's returns, normalised per task."""
        returns = R.discounted_returns(trajectories.rewards, trajectories.mask, self.gamma)
        values = R.fit_linear_baseline(trajectories.observations, returns, trajectories.mask)
        advantages = R.gae(trajectories.rewards, values, trajectories.mask, self.gamma, self.gae_lambda)
        return R.normalise(advantages, trajectories.mask)

    @staticmethod
    def pack(trajectories: Trajectories, advantages: torch.Tensor):
        """Per task: observations ``[T, N*H, obs]`` and the loss's target ``[T, N*H, act + 2]``."""
        t = trajectories
        target = torch.cat([t.actions, advantages[..., None], t.mask[..., None]], dim=-1)
        return t.observations.flatten(1, 2), target.flatten(1, 2)

    # ------------------------------------------------------------------ adaptation
    def inner_step(self, params: dict, per_task: bool, observations, target, create_graph: bool) -> dict:
        """One inner step of every task (the rule's ``inner_loop``, vmapped over tasks)."""
        def one(p, o, y):
            fast = p
            for fast in self.learner.inner_loop(p, {}, o, y, 1, create_graph):
                pass
            return fast

        with self.learner.forward_context():
            return vmap(one, in_dims=(0 if per_task else None, 0, 0), randomness="different")(params, observations,
                                                                                             target)

    def adapt_along(self, support: list, create_graph: bool) -> dict:
        """The adapted weights of every task as a function of the meta-parameters, through the
        recorded support data of each step (``[(observations, target), ...]``, constants)."""
        fast, per_task = self.learner.meta_params(), False
        for observations, target in support:
            fast, per_task = self.inner_step(fast, per_task, observations, target, create_graph), True
        return fast

    def collect(self, tasks: torch.Tensor, steps: int, test: bool = False, first: int = 0):
        """Sample and adapt without a graph: the support data of each step, each task's adapted
        weights, and the trajectories before adapting and after each step (``steps + 1`` sets).
        ``first``: the place of ``tasks[0]`` in the meta-batch (see ``_generators``); the
        environment copies are seeded by their place in it too (gymnasium's vector environments
        seed copy k with seed + k)."""
        return self._collect(tasks, steps, test, first)[:3]

    def _collect(self, tasks: torch.Tensor, steps: int, test: bool = False, first: int = 0,
                 graph_chunk: Optional[int] = None):
        """``collect``; with ``graph_chunk`` (training), each inner step is taken once, with the
        graph the meta-gradient needs, ``graph_chunk`` tasks at a time as the outer step's chunks,
        and those weights are returned too (one dict per chunk; the sampling weights are the same,
        detached; with ``explicit``, one ``explicit.Adaptation`` per chunk). Otherwise the fourth
        item is None."""
        phase = 0 if test else self.iteration + 1
        seed = (self.seed * 100_003 + phase) * 10_007 % (2 ** 30) + first * self.trajectories  # no wrap-around
        env = self.family.make_env(tasks, self.trajectories, seed=seed)
        try:
            fast, per_task = detach(self.learner.meta_params()), False
            support, sampled = [], []
            parts = None if graph_chunk is None else [slice(start, start + graph_chunk)
                                                      for start in range(0, tasks.shape[0], graph_chunk)]
            if self.explicit:
                parts = parts or [slice(None)]
                adapted = [self._adaptation(keep=graph_chunk is not None) for _ in parts]
            else:
                adapted = None if parts is None else [self.learner.meta_params()] * len(parts)
            for step in range(steps + 1):
                trajectories = sample(env, self.policy, fast, self.horizon,
                                      self._generators(tasks, first, step, test), per_task)
                sampled.append(trajectories)
                if step == steps:
                    break
                advantages = self.advantages(trajectories)
                if test and step > 0:
                    advantages = advantages * 0.5  # half the rate: exact for rules linear in the gradient
                observations, target = self.pack(trajectories, advantages)
                support.append((observations, target))
                if self.explicit:
                    chunks = [a.step(observations[part], target[part]) for a, part in zip(adapted, parts)]
                    fast = {name: torch.cat([weights[name] for weights in chunks]) for name in fast}
                elif adapted is not None:
                    adapted = [self.inner_step(weights, per_task, observations[part], target[part], not self.first_order)
                               for weights, part in zip(adapted, parts)]
                    fast = {name: torch.cat([weights[name].detach() for weights in adapted]) for name in fast}
                else:
                    with torch.no_grad():
                        fast = self.inner_step(fast, per_task, observations, target, False)
                per_task = True
        finally:
            env.close()
        return support, fast, sampled, adapted if graph_chunk is not None else None

    # ------------------------------------------------------------------ the outer objective
    def _query_terms(self, fast, query: Trajectories, advantages, old_out, old_log_prob, with_kl: bool = True):
        """Per-task surrogate (minus the importance-weighted advantage) and mean KL from the old
        policy, the ratio, and the outputs and log-probabilities. ``old_out=None``: the old policy
        is the one these weights give (their outputs, detached)."""
        out = policy_outputs(self.policy, fast, query.observations.flatten(1, 2), per_task=True)
        mask = query.mask.flatten(1, 2)
        count = mask.sum(1).clamp_min(1)
        log_prob = self.policy.log_prob(out, query.actions.flatten(1, 2))
        if old_out is None:
            old_out, old_log_prob = out.detach(), log_prob.detach()
        ratio = torch.exp(log_prob - old_log_prob)
        surrogate = -(ratio * advantages.flatten(1, 2) * mask).sum(1) / count
        kl = (self.policy.kl(old_out, out) * mask).sum(1) / count if with_kl else None
        return surrogate, kl, ratio, out, log_prob

    def _chunk_size(self, tasks: int, rows_per_task: int) -> int:
        """Tasks per chunk of the outer step (``_parts``) for tasks of ``rows_per_task`` time steps."""
        if self.task_chunk == "auto":
            return max(1, self.CHUNK_ROWS // rows_per_task)
        return self.task_chunk or tasks

    def _parts(self, support, query: Trajectories, *per_task, rows_per_task: Optional[int] = None,
               size: Optional[int] = None):
        """The iteration's data in chunks of tasks, each with its share of the tasks: the outer
        step runs chunk by chunk so that a chunk's working set stays in cache, as the supervised
        engine does. ``task_chunk="auto"`` bounds a chunk to about ``CHUNK_ROWS`` time steps (of
        ``rows_per_task`` each, by default a task's query steps): 5 tasks of 20 x 100 steps, all 20
        tasks for curvature on a fifth of them (measured fastest by benchmarks/rl_navigation.py).
        ``size``: tasks per chunk, as given."""
        total = query.mask.shape[0]
        size = size or self._chunk_size(total, rows_per_task or query.mask.shape[1] * query.mask.shape[2])
        for start in range(0, total, size):
            part = slice(start, start + size)
            share = len(range(total)[part]) / total
            yield (share, [(o[part], y[part]) for o, y in support], query.tasks(part), *(x[part] for x in per_task))

    def objective(self, support, query: Trajectories, advantages, old_out, old_log_prob, create_graph: bool):
        """(mean surrogate, mean KL) over tasks, as functions of the outer parameters."""
        surrogate, kl = 0, 0
        for share, s, q, a, o, lp in self._parts(support, query, advantages, old_out, old_log_prob):
            if self.explicit and not torch.is_grad_enabled():
                adaptation = self._adaptation(keep=False)
                for observations, target in s:
                    adaptation.step(observations, target)
                fast = adaptation.fast
            else:
                fast = self.adapt_along(s, create_graph)
            part_surrogate, part_kl = self._query_terms(fast, q, a, o, lp)[:2]
            surrogate, kl = surrogate + share * part_surrogate.mean(), kl + share * part_kl.mean()
        return surrogate, kl

    def meta_gradient(self, support, query, advantages, old_out, old_log_prob):
        """The surrogate and its gradient w.r.t. every outer parameter (the policy's, and Meta-SGD's
        rates), through the adaptation; one chunk of tasks at a time."""
        return self._meta_gradient(support, query, advantages, old_out, old_log_prob)[:2]

    def _meta_gradient(self, support, query, advantages, old_out=None, old_log_prob=None, adapted=None):
        """``meta_gradient``, and the adapted policies' outputs and log-probabilities on the query
        steps. With ``old_out=None`` the old policy is the adapted one at the current parameters,
        whose outputs the surrogate's forward pass computes anyway (``train_step``: one pass over
        the query steps fewer than computing them first). ``adapted``: the adapted weights with
        their graph, one dict per chunk of tasks (``_collect``), in place of adapting again."""
        if self.explicit:
            return self._explicit_meta_gradient(support, query, advantages, old_out, old_log_prob, adapted)
        params, loss, grads, outs, log_probs = list(self.parameters()), 0.0, None, [], []
        given = () if old_out is None else (old_out, old_log_prob)
        size = None if adapted is None else len(next(iter(adapted[0].values())))  # tasks in the first chunk
        for index, (share, s, q, a, *old) in enumerate(self._parts(support, query, advantages, *given, size=size)):
            fast = self.adapt_along(s, not self.first_order) if adapted is None else adapted[index]
            surrogate, _, _, out, log_prob = self._query_terms(fast, q, a, *(old or (None, None)), with_kl=False)
            part = share * surrogate.mean()
            part_grads = torch.autograd.grad(part, params)
            grads = part_grads if grads is None else tuple(g + p for g, p in zip(grads, part_grads))
            loss = loss + part.detach()
            outs.append(out.detach())
            log_probs.append(log_prob.detach())
        return loss, grads, torch.cat(outs), torch.cat(log_probs)

    # ------------------------------------------------------------------ explicit derivatives
    def _adaptation(self, support=(), keep: bool = True, first_order: Optional[bool] = None) -> explicit.Adaptation:
        """The inner steps as ``explicit.Adaptation`` from the current (detached) parameters,
        through the support sets given; ``keep=False``: weights only, nothing kept to
        differentiate (sampling and the line search); ``first_order``: by default the learner's."""
        params = {name: p.detach() for name, p in self.policy.named_parameters()}
        rates = self.inner_lr if self.rule == "maml" else \
            {name: self.learner.inner_lrs[self.learner._key(name)].detach() for name in params}
        first_order = self.first_order if first_order is None else first_order
        adaptation = explicit.Adaptation(self.policy, params, rates, first_order, keep)
        for observations, target in support:
            adaptation.step(observations, target)
        return adaptation

    def _outputs(self, fast: dict, observations: torch.Tensor) -> torch.Tensor:
        """The policy's outputs with each task's weights ``fast``, computed as the outer step
        computes them (``explicit.MLPPass`` or ``policy_outputs``), to the bit."""
        if not self.explicit:
            return policy_outputs(self.policy, fast, observations, per_task=True)
        return explicit.MLPPass(self.policy, fast, observations, curvature=False).outputs(fast["log_std"])

    def _flat_names(self) -> list:
        """Each outer parameter's key in ``explicit``'s gradients: (policy, name) or (rates, name)."""
        keys, rate_names = [], {self.learner._key(n): n for n, _ in self.policy.named_parameters()} \
            if self.rule == "metasgd" else {}
        for name, _ in self.named_parameters():
            if name.startswith("policy."):
                keys.append((0, name[len("policy."):]))
            else:
                keys.append((1, rate_names[name[len("learner.inner_lrs."):]]))
        return keys

    @staticmethod
    def _outer_gradients(keys: list, grad: dict, rate_grad) -> list:
        """``explicit``'s gradients in the order of ``self.parameters()`` (``keys``: ``_flat_names``)."""
        return [(grad if which == 0 else rate_grad)[name] for which, name in keys]

    def _explicit_meta_gradient(self, support, query, advantages, old_out, old_log_prob, adapted):
        """``_meta_gradient`` by ``explicit``'s products: the surrogate's gradient w.r.t. the
        adapted weights by a backward pass over the query steps, carried to the outer parameters
        through the adaptation (``Adaptation.transpose``)."""
        loss, grads, outs, log_probs, keys = 0.0, None, [], [], self._flat_names()
        given = () if old_out is None else (old_out, old_log_prob)
        size = None if adapted is None else adapted[0].fast["log_std"].shape[0]
        for index, (share, s, q, a, *old) in enumerate(self._parts(support, query, advantages, *given, size=size)):
            adaptation = self._adaptation(s) if adapted is None else adapted[index]
            net = explicit.MLPPass(self.policy, adaptation.fast, q.observations.flatten(1, 2), curvature=False)
            out = net.outputs(adaptation.fast["log_std"])
            actions, mask = q.actions.flatten(1, 2), q.mask.flatten(1, 2)
            log_prob = self.policy.log_prob(out, actions)
            ratio = torch.exp(log_prob - old[1]) if old else torch.ones_like(log_prob)
            count = mask.sum(1, keepdim=True).clamp_min(1)
            weighted = ratio * a.flatten(1, 2) * mask / count
            loss = loss - share * weighted.sum(1).mean()
            weight = (share * weighted / mask.shape[0])[..., None]
            residual, inv_var = actions - net.mean, torch.exp(-2 * adaptation.fast["log_std"])[:, None, :]
            grad_mean, grad_log_std = explicit.score_gradients(residual, inv_var, weight,
                                                               (weight * residual * residual).sum(1))
            grad = net.backward(grad_mean)[0]
            grad["log_std"] = grad_log_std
            part_grads = self._outer_gradients(keys, *adaptation.transpose(grad))
            grads = part_grads if grads is None else [g + p for g, p in zip(grads, part_grads)]
            outs.append(out)
            log_probs.append(log_prob)
        return loss, tuple(grads), torch.cat(outs), torch.cat(log_probs)

    def _explicit_kl_hvp(self, support, query, old_out):
        """``kl_hvp`` by ``explicit``'s products: ``J v`` is the adaptation's tangent carried
        through the query pass's tangent, ``J^T`` the query pass's backward carried back through
        the adaptation; the same curvature, on the same share of the data."""
        act, pieces = self.policy.action_dim, []
        rows = self._curvature_trajectories(query) * query.mask.shape[2]
        for share, s, q, o in self._parts(support, query, old_out, rows_per_task=rows):
            s, part, old, weights = self._curvature_share(s, q, o)
            adaptation = self._adaptation(s, first_order=False)  # the KL's curvature through the real adaptation
            net = explicit.MLPPass(self.policy, adaptation.fast, part.observations.flatten(1, 2), curvature=False)
            old = net.outputs(adaptation.fast["log_std"]) if old is None else old
            pieces.append((adaptation, net, old, (weights * share)[..., None]))
        keys = self._flat_names()
        params = list(self.parameters())

        def product(vector):
            values = [vector[o:o + p.numel()].view_as(p) for o, p in zip(_offsets(params), params)]
            theta = {name: v for (which, name), v in zip(keys, values) if which == 0}
            rates = {name: v for (which, name), v in zip(keys, values) if which == 1} or None
            total = 0
            for adaptation, net, old, weights in pieces:
                tangent = adaptation.tangent(theta, rates)
                dmean = net.tangent(tangent)[0][-1]
                dlog_std = tangent["log_std"].expand(dmean.shape[0], -1)[:, None, :].expand_as(dmean)
                metric = self.policy.kl_hessian_product(old, torch.cat([dmean, dlog_std], dim=-1)) * weights
                grad = net.backward(metric[..., :act])[0]
                grad["log_std"] = metric[..., act:].sum(1)
                total = total + torch.cat([g.reshape(-1) for g in self._outer_gradients(keys, *adaptation.transpose(grad))])
            return self.cg_damping * vector + _mean_over_processes(total)
        return product

    def _curvature_trajectories(self, query: Trajectories) -> int:
        """How many of each task's trajectories the curvature products use (``hvp_fraction``)."""
        return max(1, math.ceil(self.hvp_fraction * query.mask.shape[1]))

    def _curvature_share(self, support, query: Trajectories, old_out):
        """The data the curvature is taken on (``hvp_fraction``): the support sets and the query
        trajectories cut to that share of each task's trajectories, the old outputs on those
        query steps (None on a smaller share: the curvature of that smaller problem, whose old
        policy is the one adapted on it), and each step's weight in the mean KL."""
        share, trajectories = self._curvature_trajectories(query), query.mask.shape[1]
        part, old = query.subset(share), None
        if share < trajectories:
            support = [(o[:, :share * (o.shape[1] // trajectories)], y[:, :share * (y.shape[1] // trajectories)])
                       for o, y in support]
        else:
            old = old_out  # [T, N * H, outputs], as the query steps are flattened
        mask = part.mask.flatten(1, 2)
        return support, part, old, mask / mask.sum(1, keepdim=True).clamp_min(1) / mask.shape[0]

    def _kl_graph(self, support, query, old_out):
        """The policy's outputs on (a share of) the query steps as a function of the outer
        parameters, with the same old outputs and the weight of each step in the mean KL."""
        support, part, old, weights = self._curvature_share(support, query, old_out)
        fast = self.adapt_along(support, create_graph=True)
        out = policy_outputs(self.policy, fast, part.observations.flatten(1, 2), per_task=True)
        return out, out.detach() if old is None else old, weights

    def kl_hvp(self, support, query, old_out):
        """A function ``v -> (H + damping I) v`` with H the Hessian of the mean KL w.r.t. the
        outer parameters (flat vectors), through the adaptation.

        At the current parameters the KL is at its minimum (the new policy is the old one), so its
        Hessian is exactly ``J^T M J``: ``J`` the Jacobian of the policy's outputs on the query steps
        w.r.t. the outer parameters (through the adaptation) and ``M`` the KL's Hessian w.r.t. those
        outputs, which is closed-form (``policy.kl_hessian_product``). A product is then one
        Jacobian-vector product (a backward pass of ``J^T u``, linear in ``u``, differentiated w.r.t.
        ``u``) and one vector-Jacobian product, with no third derivatives of the inner loss; the
        graphs are built once per iteration, one per chunk of tasks. (With ``explicit``: the same
        products, written out.)"""
        if self.explicit:
            return self._explicit_kl_hvp(support, query, old_out)
        params, graphs = list(self.parameters()), []
        rows = self._curvature_trajectories(query) * query.mask.shape[2]
        for share, s, q, o in self._parts(support, query, old_out, rows_per_task=rows):
            out, old, weights = self._kl_graph(s, q, o)
            probe = torch.zeros_like(out, requires_grad=True)
            transposed = torch.autograd.grad(out, params, grad_outputs=probe, create_graph=True)
            graphs.append((out, old, weights * share, probe, transposed))

        def product(vector):
            pieces = [vector[o:o + p.numel()].view_as(p) for o, p in zip(_offsets(params), params)]
            total = 0
            for out, old, weights, probe, transposed in graphs:
                jv = torch.autograd.grad(transposed, probe, grad_outputs=pieces, retain_graph=True)[0]
                metric_jv = self.policy.kl_hessian_product(old, jv) * weights[..., None]
                hv = torch.autograd.grad(out, params, grad_outputs=metric_jv, retain_graph=True)
                total = total + torch.cat([h.reshape(-1) for h in hv])
            return self.cg_damping * vector + _mean_over_processes(total)
        return product

    # ------------------------------------------------------------------ one meta-iteration
    def prepare(self, tasks: torch.Tensor, first: int = 0):
        """Everything an outer step needs for ``tasks`` (the first at place ``first`` of the
        meta-batch): support data, query trajectories sampled with the adapted policies, their
        advantages and the adapted policies' outputs and log-probabilities."""
        support, fast, sampled = self.collect(tasks, self.inner_steps, first=first)
        query = sampled[-1]
        advantages = self.advantages(query)
        with torch.no_grad():
            old_out = self._outputs(fast, query.observations.flatten(1, 2))
            old_log_prob = self.policy.log_prob(old_out, query.actions.flatten(1, 2))
        returns = torch.stack([t.task_returns() for t in sampled], dim=1)
        return support, query, advantages, old_out, old_log_prob, returns

    def train_step(self, batch, optimizer, *, per_step: bool = False, clip_grad=None, before_update=None):
        """One meta-iteration on ``batch`` (a ``TaskParams`` or a tensor of tasks). Under
        torch.distributed each process holds a slice of the meta-batch; the gradient (through
        ``before_update``, the Trainer's average), every curvature product and the line search's
        surrogate and KL are averaged over the processes, so all take the step one process would."""
        tasks = batch.tasks if hasattr(batch, "tasks") else batch
        first = getattr(batch, "first", 0)
        if self.outer == "ppo":
            support, query, advantages, old_out, old_log_prob, returns = self.prepare(tasks, first)
            return self._ppo(support, query, advantages, old_out, old_log_prob, returns, optimizer, clip_grad,
                             before_update)
        # the adaptation is taken once, with its graph, and the old policy's outputs come from the
        # surrogate's forward pass: two passes over the data fewer than prepare() then meta_gradient()
        chunk = self._chunk_size(tasks.shape[0], self.trajectories * self.horizon)
        support, _, sampled, adapted = self._collect(tasks, self.inner_steps, first=first, graph_chunk=chunk)
        query = sampled[-1]
        returns = torch.stack([t.task_returns() for t in sampled], dim=1)
        return self._trpo(support, query, self.advantages(query), None, None, returns, optimizer, before_update,
                          adapted)

    def _trpo(self, support, query, advantages, old_out, old_log_prob, returns, optimizer, before_update,
              adapted=None):
        params = list(self.parameters())
        loss, grads, old_out, old_log_prob = self._meta_gradient(support, query, advantages, old_out, old_log_prob,
                                                                 adapted)
        for p, grad in zip(params, grads):
            p.grad = grad.detach()
        out = RLOutput(loss=loss, returns=returns)
        if before_update is not None:
            before_update(out)  # the Trainer averages .grad over processes and guards the loss here
        g = torch.cat([p.grad.reshape(-1) for p in params]).detach()
        loss = _mean_over_processes(loss)
        product = self.kl_hvp(support, query, old_out)
        direction, curved = conjugate_gradient(product, g, self.cg_iters, return_product=True)
        curvature = 0.5 * torch.dot(direction, curved)
        del product
        if not (curvature > 0 and torch.isfinite(curvature)):
            out.kl, out.accepted = 0.0, False
            return out
        full_step = direction * torch.sqrt(self.max_kl / curvature)
        start = torch.nn.utils.parameters_to_vector(params).detach()
        accepted, kl_value = False, 0.0
        with torch.no_grad():
            for k in range(self.ls_steps):
                torch.nn.utils.vector_to_parameters(start - self.ls_ratio ** k * full_step, params)
                new_loss, new_kl = self.objective(support, query, advantages, old_out, old_log_prob, False)
                new_loss, new_kl = _mean_over_processes(torch.stack([new_loss, new_kl]))
                if new_loss < loss and new_kl <= self.max_kl and torch.isfinite(new_loss):
                    accepted, kl_value = True, float(new_kl)
                    break
            end = torch.nn.utils.parameters_to_vector(params).detach() if accepted else start
            torch.nn.utils.vector_to_parameters(start, params)
        # the accepted step goes through the optimiser (SGD at rate 1), so its state is a run's like any
        optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (start - end)[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        optimizer.step()
        out.kl, out.accepted = kl_value, accepted
        return out

    def _ppo(self, support, query, advantages, old_out, old_log_prob, returns, optimizer, clip_grad, before_update):
        first = None
        for epoch in range(self.ppo_epochs):
            optimizer.zero_grad(set_to_none=True)
            fast = self.adapt_along(support, not self.first_order)
            _, kl, ratio, _, _ = self._query_terms(fast, query, advantages, old_out, old_log_prob)
            adv, mask = advantages.flatten(1, 2), query.mask.flatten(1, 2)
            clipped = torch.minimum(ratio * adv, ratio.clamp(1 - self.ppo_clip, 1 + self.ppo_clip) * adv)
            loss = (-(clipped * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
            loss.backward()
            out = RLOutput(loss=loss.detach(), returns=returns, kl=float(kl.mean().detach()), accepted=True)
            if first is None:
                first = out
                if before_update is not None:
                    before_update(out)  # averages .grad over processes
            else:
                distributed.average_gradients(self.parameters(), distributed.current())
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(self.parameters(), clip_grad)
            optimizer.step()
        first.kl = out.kl
        return first

    # ------------------------------------------------------------------ evaluation
    def fine_tune(self, batch, inner_steps: Optional[int] = None) -> RLOutput:
        """Mean return of every task before adapting and after each of ``inner_steps`` steps
        (default: the training steps), each measured on trajectories sampled with the policy as
        adapted so far; touches no meta-parameter."""
        tasks = batch.tasks if hasattr(batch, "tasks") else batch
        steps = self.inner_steps if inner_steps is None else inner_steps
        with torch.no_grad():
            _, _, sampled = self.collect(tasks, steps, test=True, first=getattr(batch, "first", 0))
        returns = torch.stack([t.task_returns() for t in sampled], dim=1)
        return RLOutput(loss=-returns[:, -1].mean(), returns=returns)


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes of a distributed run (each holds as many tasks);
    ``value`` itself in one process."""
    return distributed.average(value, distributed.current())


def _offsets(params) -> list:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    return offsets


def conjugate_gradient(product, b: torch.Tensor, iterations: int, tolerance: float = 1e-10,
                       return_product: bool = False):
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``product(v) = A v``.
    With ``return_product``, also ``A x``, accumulated from the products the iterations took
    (``x`` is a sum of search directions), which saves TRPO one more product for its step size."""
    x, ax = torch.zeros_like(b), torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = torch.dot(r, r)
    for _ in range(iterations):
        ap = product(p)
        alpha = rr / torch.dot(p, ap)
        x = x + alpha * p
        ax = ax + alpha * ap
        r = r - alpha * ap
        new_rr = torch.dot(r, r)
        if new_rr < tolerance:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    return (x, ax) if return_product else x
