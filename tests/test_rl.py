"""Meta-RL: environments, policies, returns and the baseline, and MAML-TRPO's gradients against
independent references in float64."""

import math
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fastadapt.rl import (CategoricalMLPPolicy, GaussianMLPPolicy, MAMLTRPO, PolicyGradientLoss,
                          conjugate_gradient, families, family, returns as R)


def test_navigation_dynamics_rewards_termination_and_seeded_goals():
    nav = family("navigation-2d")
    goals = nav.sample_tasks(1000, torch.Generator().manual_seed(0))
    assert goals.shape == (1000, 2) and goals.abs().max() <= 0.5 and goals.abs().max() > 0.45
    torch.testing.assert_close(goals, nav.sample_tasks(1000, torch.Generator().manual_seed(0)))
    env = nav.make_env(torch.tensor([[0.3, -0.2], [0.05, 0.0]]), trajectories=3)
    assert torch.equal(env.reset(), torch.zeros(2, 3, 2))
    obs, reward, done = env.step(torch.tensor([[[1.0, -1.0], [0.02, 0.0], [-5.0, 0.5]]] * 2))
    torch.testing.assert_close(obs[0], torch.tensor([[0.1, -0.1], [0.02, 0.0], [-0.1, 0.1]]))  # clipped to 0.1
    torch.testing.assert_close(reward[0, 0], -torch.tensor([0.2, 0.1]).norm())
    assert not done.any()
    obs, reward, done = env.step(torch.tensor([[[0.0, 0.0], [0.03, 0.0], [0.0, 0.0]]] * 2))
    assert done[1, 1] and not done[0].any() and done.sum() == 1   # both coordinates within 0.01 of the goal
    with pytest.raises(ValueError, match="unknown environment 'nope'; the environments are .*navigation-2d"):
        family("nope")
    assert {"navigation-2d", "halfcheetah-dir", "halfcheetah-vel"} <= set(families())


def test_policy_log_probabilities_and_kl_match_torch_distributions():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(8,), init_std=0.7).double()
    obs = torch.randn(5, 3, dtype=torch.float64)
    out = policy(obs)
    mean, log_std = policy.split(out)
    normal = torch.distributions.Normal(mean, log_std.exp())
    actions = policy.sample(out, torch.Generator().manual_seed(1))
    torch.testing.assert_close(policy.log_prob(out, actions), normal.log_prob(actions).sum(-1))
    other = out + 0.1 * torch.randn_like(out)
    expected = torch.distributions.kl_divergence(normal, torch.distributions.Normal(*policy.split(other)[:1],
                                                                                      policy.split(other)[1].exp()))
    torch.testing.assert_close(policy.kl(out, other), expected.sum(-1))
    discrete = CategoricalMLPPolicy(3, 4, hidden=(8,)).double()
    logits = discrete(obs)
    picks = discrete.sample(logits, torch.Generator().manual_seed(2))
    categorical = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(discrete.log_prob(logits, picks), categorical.log_prob(picks[:, 0].long()))
    other = logits + torch.randn_like(logits)
    torch.testing.assert_close(discrete.kl(logits, other), torch.distributions.kl_divergence(
        categorical, torch.distributions.Categorical(logits=other)))
    # the KL's Hessian w.r.t. the new output at the old one, closed form against autograd
    for p, o in ((policy, out[0].detach()), (discrete, logits[0].detach())):
        u = torch.randn_like(o)
        hessian = torch.autograd.functional.hessian(lambda new: p.kl(o, new), o.clone())
        torch.testing.assert_close(p.kl_hessian_product(o, u), hessian @ u)


def test_sampled_actions_follow_the_policies_distributions_and_their_noise():
    """Categorical actions by inverse CDF at the given uniform noise, Gaussian ones mean + std *
    noise: frequencies and moments over many draws, and the same noise gives the same actions."""
    torch.manual_seed(0)
    discrete = CategoricalMLPPolicy(3, 4, hidden=(8,)).double()
    logits = discrete(torch.randn(1, 3, dtype=torch.float64)).expand(200_000, 4)
    picks = discrete.sample(logits, torch.Generator().manual_seed(3))[:, 0].long()
    frequencies = torch.bincount(picks, minlength=4).double() / picks.numel()
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=4e-3, rtol=0)
    edges = torch.tensor([[0.0], [1 - 1e-12], [0.9999999999999999]], dtype=torch.float64)
    assert discrete.sample(logits[:3], noise=edges)[:, 0].tolist() == [0.0, 3.0, 3.0]  # never out of range
    noise = discrete.noise((5,), torch.Generator().manual_seed(4), torch.float64)
    assert torch.equal(discrete.sample(logits[:5], noise=noise), discrete.sample(logits[:5], noise=noise))
    gaussian = GaussianMLPPolicy(3, 2, hidden=(8,), init_std=0.5).double()
    out = gaussian(torch.randn(1, 3, dtype=torch.float64)).expand(200_000, 4)
    actions = gaussian.sample(out, torch.Generator().manual_seed(5))
    mean, log_std = gaussian.split(out[0])
    torch.testing.assert_close(actions.mean(0), mean, atol=5e-3, rtol=0)
    torch.testing.assert_close(actions.std(0), log_std.exp(), atol=5e-3, rtol=0)
    noise = gaussian.noise((2,), torch.Generator().manual_seed(6), torch.float64)
    torch.testing.assert_close(gaussian.sample(out[:2], noise=noise), mean + log_std.exp() * noise)


def test_returns_gae_and_the_linear_baseline_against_references():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones_like(rewards)
    mask[0, 1, 4:] = 0
    rewards = rewards * mask
    out = R.discounted_returns(rewards, mask, 0.9)
    assert out[0, 1, 4:].abs().sum() == 0
    torch.testing.assert_close(out[1, 2, 2], sum(0.9 ** k * rewards[1, 2, 2 + k] for k in range(4)))
    values = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * mask
    advantages = R.gae(rewards, values, mask, 0.9, 1.0)
    torch.testing.assert_close(advantages, (out - values) * mask)   # lambda = 1: returns minus the baseline
    lam = R.gae(rewards, values, mask, 0.9, 0.5)
    delta = lambda t: rewards[1, 0, t] + 0.9 * (values[1, 0, t + 1] if t < 5 else 0) - values[1, 0, t]
    torch.testing.assert_close(lam[1, 0, 3], delta(3) + 0.45 * delta(4) + 0.45 ** 2 * delta(5))
    obs = torch.randn(2, 3, 6, 2, generator=g, dtype=torch.float64)
    fitted = R.fit_linear_baseline(obs, out, mask, regularisation=1e-5)
    for task in range(2):  # ridge regression on the task's valid steps, by numpy
        x = R.baseline_features(obs, mask)[task].reshape(-1, 8).numpy()
        rows = mask[task].reshape(-1).numpy() > 0
        x, y = x[rows], out[task].reshape(-1).numpy()[rows]
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(8), x.T @ y)
        np.testing.assert_allclose(fitted[task].reshape(-1).numpy()[rows], x @ w, atol=1e-8)
        assert not fitted[task].reshape(-1).numpy()[~rows].any()
    normalised = R.normalise(advantages, mask)
    for task in range(2):
        valid = normalised[task][mask[task] > 0]
        assert abs(float(valid.mean())) < 1e-9 and abs(float(valid.std(unbiased=False)) - 1) < 1e-6


def _fixed_setting(steps, first_order, tasks=3, inner_estimator="reinforce", rule="maml", explicit=None):
    """A float64 MAML-TRPO on navigation with fixed recorded trajectories (``explicit``: whether it
    takes the adaptation's derivatives as explicit products or by autograd; None: its default)."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=(6, 6), activation="tanh", init_std=0.5).double()
    learner = MAMLTRPO(policy, family("navigation-2d"), inner_lr=0.3, inner_steps=steps, first_order=first_order,
                       trajectories=4, horizon=7, seed=3, inner_estimator=inner_estimator, rule=rule)
    if explicit is not None:
        learner.explicit = explicit
    goals = family("navigation-2d").sample_tasks(tasks, torch.Generator().manual_seed(1))
    support, query, advantages, old_out, old_log_prob, _ = learner.prepare(goals)
    return learner, policy, support, query, advantages, old_out, old_log_prob


def _loop_surrogate(policy, support, query, advantages, old_log_prob, lr, first_order, loss_fn=None):
    """An independent per-task loop: autograd.grad inner steps, then the importance-weighted surrogate."""
    params = dict(policy.named_parameters())
    loss_fn = loss_fn or PolicyGradientLoss(policy)
    total = 0
    for t in range(query.mask.shape[0]):
        fast = dict(params)
        for obs, target in support:
            inner = loss_fn(functional_call(policy, fast, (obs[t],)), target[t])
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
        out = functional_call(policy, fast, (query.observations[t].flatten(0, 1),))
        mask = query.mask[t].flatten()
        ratio = torch.exp(policy.log_prob(out, query.actions[t].flatten(0, 1)) - old_log_prob[t])
        total = total - (ratio * advantages[t].flatten() * mask).sum() / mask.sum()
    return total / query.mask.shape[0]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_a_per_task_loop_in_float64(steps, first_order):
    learner, policy, support, query, advantages, old_out, old_log_prob = _fixed_setting(steps, first_order)
    assert len(support) == steps
    loss, grads = learner.meta_gradient(support, query, advantages, old_out, old_log_prob)
    reference = _loop_surrogate(policy, support, query, advantages, old_log_prob, 0.3, first_order)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, torch.autograd.grad(reference, list(policy.parameters()))):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    # train_step's path: the old policy's outputs taken from the surrogate's own forward pass
    same_loss, same_grads, outputs, log_probs = learner._meta_gradient(support, query, advantages)
    torch.testing.assert_close(same_loss, loss, rtol=1e-12, atol=1e-14)
    for ours, theirs in zip(same_grads, grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(outputs, old_out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(log_probs, old_log_prob, rtol=1e-12, atol=1e-14)
    if not first_order:  # and the first-order gradient is a different one
        first = _loop_surrogate(policy, support, query, advantages, old_log_prob, 0.3, True)
        assert any(not torch.allclose(a, b) for a, b in zip(grads, torch.autograd.grad(first, list(policy.parameters()))))


def _lvc_loss(policy):
    """ProMP's LVC inner loss written out: the likelihood ratio to the sampling policy (a constant
    that equals it), times the advantage, weighted."""
    def loss(out, target):
        log_prob = policy.log_prob(out, target[..., :2])
        ratio = torch.exp(log_prob) / torch.exp(log_prob).detach()
        return -(ratio * target[..., 2] * target[..., 3]).sum() / target[..., 3].sum()
    return loss


@pytest.mark.parametrize("steps", [1, 2])
def test_lvc_inner_estimator_keeps_the_inner_step_and_adds_the_sampling_curvature(steps):
    learner, policy, support, query, advantages, old_out, old_log_prob = _fixed_setting(steps, False,
                                                                                       inner_estimator="lvc")
    loss, grads = learner.meta_gradient(support, query, advantages, old_out, old_log_prob)
    reference = _loop_surrogate(policy, support, query, advantages, old_log_prob, 0.3, False, _lvc_loss(policy))
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, torch.autograd.grad(reference, list(policy.parameters()))):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    plain = _loop_surrogate(policy, support, query, advantages, old_log_prob, 0.3, False)
    torch.testing.assert_close(plain.detach(), loss, rtol=1e-10, atol=1e-12)  # the same inner steps, the same loss
    assert any(not torch.allclose(a, b) for a, b in zip(grads, torch.autograd.grad(plain, list(policy.parameters()))))
    first = _fixed_setting(steps, True, inner_estimator="lvc")
    first_plain = _fixed_setting(steps, True, explicit=False)  # autograd's path for both: equal to the bit
    for a, b in zip(first[0].meta_gradient(*first[2:])[1], first_plain[0].meta_gradient(*first_plain[2:])[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # first order, the estimators are one

    # the Hessian of the LVC loss is REINFORCE's plus sum_r c_r g_r g_r^T, g_r the per-step score
    obs, target = support[0][0][0], support[0][1][0]
    params = dict(policy.named_parameters())
    names, values = list(params), list(params.values())
    vector = [torch.randn_like(v) for v in values]

    def hvp(loss_fn):
        grads = torch.autograd.grad(loss_fn(functional_call(policy, params, (obs,)), target), values, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), values)

    lvc, reinforce = hvp(PolicyGradientLoss(policy, "lvc")), hvp(PolicyGradientLoss(policy))
    weight = target[:, 2] * target[:, 3] / target[:, 3].sum()
    correction = [torch.zeros_like(v) for v in values]
    for row in range(obs.shape[0]):
        score = torch.autograd.grad(policy.log_prob(functional_call(policy, params, (obs[row:row + 1],)),
                                                    target[row:row + 1, :2]).sum(), values)
        along = sum((s * v).sum() for s, v in zip(score, vector))
        correction = [c - weight[row] * along * s for c, s in zip(correction, score)]
    for name, a, b, c in zip(names, lvc, reinforce, correction):
        torch.testing.assert_close(a, b + c, rtol=1e-9, atol=1e-11, msg=name)
    with pytest.raises(ValueError, match="estimator must be one of reinforce, lvc"):
        PolicyGradientLoss(policy, "dice")


def test_hessian_vector_product_equals_finite_differences_and_the_exact_one():
    learner, policy, support, query, advantages, old_out, old_log_prob = _fixed_setting(2, False)
    learner.cg_damping = 0.0
    params = list(policy.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach()
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    product = learner.kl_hvp(support, query, old_out)(v)
    # the KL's gradient differentiated again (third derivatives of the inner loss): the exact reference
    _, kl = learner.objective(support, query, advantages, old_out, old_log_prob, True)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])
    exact = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads @ v, params)])
    torch.testing.assert_close(product, exact, rtol=1e-8, atol=1e-12)

    def kl_grad(vector):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vector, params)
        _, kl = learner.objective(support, query, advantages, old_out, old_log_prob, True)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params)])

    eps = 1e-5
    finite = (kl_grad(theta + eps * v) - kl_grad(theta - eps * v)) / (2 * eps)
    torch.nn.utils.vector_to_parameters(theta, params)
    torch.testing.assert_close(product, finite, rtol=1e-5, atol=1e-8)
    # conjugate gradient solves the damped system it is given
    learner.cg_damping = 0.1
    hvp = learner.kl_hvp(support, query, old_out)
    x = conjugate_gradient(hvp, v, iterations=200)
    torch.testing.assert_close(hvp(x), v, rtol=1e-5, atol=1e-6)
    # after a few iterations x is far from the solution; the A x it accumulates is still exact
    x, ax = conjugate_gradient(hvp, v, iterations=3, return_product=True)
    torch.testing.assert_close(ax, hvp(x), rtol=1e-6, atol=1e-9)
    assert (ax - v).norm() > 1e-3 * v.norm()


@pytest.mark.parametrize("steps,first_order,task_chunk,rule", [(1, False, 2, "maml"), (2, False, 2, "maml"),
                                                              (2, True, None, "maml"), (1, False, "auto", "maml"),
                                                              (2, False, 2, "metasgd")])
def test_train_step_adapts_once_and_takes_the_step_prepare_and_trpo_take(steps, first_order, task_chunk, rule):
    """train_step records the adaptation with its graph while sampling, chunk by chunk, and takes
    the old policy's outputs from the surrogate's pass; the step must be the one computed from
    prepare()'s separately adapted weights and outputs."""
    learners = []
    for _ in range(2):
        learner = _fixed_setting(steps, first_order, rule=rule)[0]
        learner.task_chunk = task_chunk
        learner.on_step(4)
        learners.append(learner)
    goals = family("navigation-2d").sample_tasks(3, torch.Generator().manual_seed(1))
    fused = learners[0].train_step(goals, learners[0].make_optimizer(1e-3))
    support, query, advantages, old_out, old_log_prob, returns = learners[1].prepare(goals)
    apart = learners[1]._trpo(support, query, advantages, old_out, old_log_prob, returns,
                              learners[1].make_optimizer(1e-3), None)
    assert fused.accepted and apart.accepted
    torch.testing.assert_close(fused.returns, apart.returns, rtol=0, atol=0)
    torch.testing.assert_close(fused.loss, apart.loss, rtol=1e-10, atol=1e-13)
    assert abs(fused.kl - apart.kl) < 1e-10
    for a, b in zip(learners[0].parameters(), learners[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert any(not torch.equal(a, b)
               for a, b in zip(learners[0].parameters(), _fixed_setting(steps, first_order, rule=rule)[0].parameters()))


@pytest.mark.parametrize("rule,first_order,steps,activation,hidden,fraction", [
    ("maml", False, 1, "tanh", (6, 5), 1.0), ("maml", False, 2, "tanh", (6, 5), 0.5),
    ("maml", True, 2, "relu", (6, 5), 1.0), ("metasgd", False, 2, "tanh", (6, 5), 0.5),
    ("metasgd", True, 1, "tanh", (6,), 1.0), ("maml", False, 1, "tanh", (), 0.5)])
def test_explicit_derivatives_equal_autograds_in_float64(rule, first_order, steps, activation, hidden, fraction):
    """rl/explicit.py's products (the default for Gaussian MLP policies) against autograd's graphs
    (``explicit=False``): the meta-gradient with and without given old outputs, the curvature
    product on all or half the trajectories, and the line search's objective."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=hidden, activation=activation, init_std=0.5).double()
    learner = MAMLTRPO(policy, family("navigation-2d"), inner_lr=0.3, inner_steps=steps, first_order=first_order,
                       trajectories=4, horizon=7, seed=3, rule=rule, hvp_fraction=fraction, task_chunk=2)
    assert learner.explicit
    if rule == "metasgd":  # rates of their own, so that a mix-up of names or of rates and weights shows
        with torch.no_grad():
            for rate in learner.learner.inner_lrs.values():
                rate.uniform_(0.1, 0.5)
    goals = family("navigation-2d").sample_tasks(3, torch.Generator().manual_seed(1))
    support, query, advantages, old_out, old_log_prob, _ = learner.prepare(goals)
    shifted = old_log_prob + 0.1 * torch.randn(old_log_prob.shape, generator=torch.Generator().manual_seed(2),
                                               dtype=torch.float64)  # ratios other than 1
    vector = torch.randn(sum(p.numel() for p in learner.parameters()), generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    results = []
    for explicit in (True, False):
        learner.explicit = explicit
        loss, grads = learner.meta_gradient(support, query, advantages, old_out, shifted)
        own_loss, own_grads, outputs, log_probs = learner._meta_gradient(support, query, advantages)
        product = learner.kl_hvp(support, query, old_out)(vector)
        with torch.no_grad():
            objective = torch.stack(learner.objective(support, query, advantages, old_out, shifted, False))
        results.append([loss, *grads, own_loss, *own_grads, outputs, log_probs, product, objective])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-9, atol=1e-12)
    assert results[1][-2].norm() > 1e-3 * vector.norm()  # a product that is not the damping alone


def test_explicit_derivatives_apply_only_where_they_are_written_for():
    nav = family("navigation-2d")
    assert MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(4,)), nav).explicit
    assert not MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(4,)), nav, inner_estimator="lvc").explicit

    class Wider(GaussianMLPPolicy):  # a subclass may compute its outputs otherwise
        pass

    assert not MAMLTRPO(Wider(2, 2, hidden=(4,)), nav).explicit
    mixed = GaussianMLPPolicy(2, 2, hidden=(4, 4), activation="tanh")
    mixed.body[3] = torch.nn.ReLU()  # one derivative rule per network: a mix is autograd's
    assert not MAMLTRPO(mixed, nav).explicit
    extra = GaussianMLPPolicy(2, 2, hidden=(4,), activation="relu")
    extra.body.append(torch.nn.Sigmoid())
    assert not MAMLTRPO(extra, nav).explicit
    assert MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(), activation="relu"), nav).explicit
    from fastadapt.rl.explicit import supports
    assert not supports(CategoricalMLPPolicy(4, 2, hidden=(4,)), "reinforce")
    learner = MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(4,)), nav, inner_estimator="lvc")
    with pytest.raises(ValueError, match="written for GaussianMLPPolicy with the reinforce inner loss, not "
                                         "GaussianMLPPolicy with 'lvc'"):
        learner.explicit = True
    learner.explicit = False
    assert not learner.explicit


def test_tanh_without_a_graph_is_torch_tanh():
    from fastadapt.rl.policies import tanh
    for dtype, tolerance in ((torch.float32, 2e-7), (torch.float64, 1e-15)):
        z = torch.linspace(-30, 30, 100_001, dtype=dtype)
        assert (tanh(z.clone()) - torch.tanh(z)).abs().max() <= tolerance
    policy = GaussianMLPPolicy(2, 2, hidden=(8, 8), activation="tanh")
    x = torch.randn(3, 5, 2)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        without = policy.outputs(params, x, per_task=False)
    torch.testing.assert_close(without, policy(x), rtol=0, atol=1e-6)


def test_an_accepted_trpo_step_keeps_the_kl_bound_and_improves_the_surrogate():
    learner, policy, support, query, advantages, old_out, old_log_prob = _fixed_setting(1, False)
    learner.max_kl = 1e-3
    with torch.no_grad():
        before, _ = learner.objective(support, query, advantages, old_out, old_log_prob, False)
    optimizer = learner.make_optimizer(1e-3)
    out = learner._trpo(support, query, advantages, old_out, old_log_prob, torch.zeros(3, 2), optimizer, None)
    with torch.no_grad():
        after, kl = learner.objective(support, query, advantages, old_out, old_log_prob, False)
    assert out.accepted and float(kl) <= 1e-3 and float(after) < float(before)
    assert abs(out.kl - float(kl)) < 1e-9


def test_training_improves_navigation_and_evaluation_is_seeded():
    torch.manual_seed(0)
    nav = family("navigation-2d")
    policy = GaussianMLPPolicy(2, 2, hidden=(16, 16), activation="tanh")
    learner = MAMLTRPO(policy, nav, trajectories=8, horizon=40, hvp_fraction=0.5)
    test = nav.sample_tasks(8, torch.Generator().manual_seed(9))
    before = learner.fine_tune(test, 2).returns
    torch.testing.assert_close(before, learner.fine_tune(test, 2).returns)   # the same trajectories every time
    assert before.shape == (8, 3)
    optimizer, stream = learner.make_optimizer(1e-3), torch.Generator().manual_seed(0)
    for step in range(8):
        learner.on_step(step)
        out = learner.train_step(nav.sample_tasks(10, stream), optimizer)
        assert out.returns.shape == (10, 2) and out.accepted is not None
    after = learner.fine_tune(test, 2).returns
    assert after[:, 1].mean() > before[:, 1].mean() + 1.0, (before.mean(0), after.mean(0))


def test_ppo_outer_step_and_metasgd_rates_train():
    torch.manual_seed(0)
    nav = family("navigation-2d")
    learner = MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(8,)), nav, rule="metasgd", outer="ppo", trajectories=4,
                       horizon=10, ppo_epochs=2)
    rates = [p.detach().clone() for p in learner.learner.inner_lrs.values()]
    optimizer = learner.make_optimizer(1e-2)
    out = learner.train_step(nav.sample_tasks(3, torch.Generator().manual_seed(0)), optimizer)
    assert math.isfinite(float(out.loss)) and out.kl is not None
    assert any(not torch.equal(a, b) for a, b in zip(rates, learner.learner.inner_lrs.values()))


def test_bad_input_is_one_clear_error():
    nav = family("navigation-2d")
    with pytest.raises(ValueError, match="actions are continuous, which CategoricalMLPPolicy cannot serve"):
        MAMLTRPO(CategoricalMLPPolicy(2, 3), nav)
    with pytest.raises(ValueError, match="hvp_fraction must be in"):
        MAMLTRPO(GaussianMLPPolicy(2, 2), nav, hvp_fraction=0)
    with pytest.raises(ValueError, match="outer must be 'trpo' or 'ppo'"):
        MAMLTRPO(GaussianMLPPolicy(2, 2), nav, outer="sgd")


def test_halfcheetah_families_reward_by_task_and_a_meta_iteration_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # MuJoCo would write MUJOCO_LOG.TXT here
    try:
        import gymnasium as gym
    except ImportError:
        if os.environ.get("CI") == "true":  # CI installs fastadapt[rl]: there, a missing gymnasium is a failure
            raise
        pytest.skip("pip install 'fastadapt[rl]' for the MuJoCo tests")
    for name in ("halfcheetah-dir", "halfcheetah-vel"):
        cheetah = family(name)
        assert (cheetah.observation_dim, cheetah.action_dim, cheetah.horizon) == (17, 6, 200)
        tasks = cheetah.sample_tasks(2, torch.Generator().manual_seed(0))
        torch.testing.assert_close(tasks, cheetah.sample_tasks(2, torch.Generator().manual_seed(0)))
        env = cheetah.make_env(tasks, trajectories=2, seed=4)
        first = env.reset()
        assert first.shape == (2, 2, 17)
        torch.testing.assert_close(first, cheetah.make_env(tasks, 2, seed=4).reset())
        actions = torch.full((2, 2, 6), 3.0)   # clipped to the action space's bound, 1
        obs, reward, done = env.step(actions)
        plain = gym.make("HalfCheetah-v5")
        plain.reset(seed=4)
        _, _, _, _, info = plain.step(np.ones(6))
        task = float(tasks[0, 0])
        expected = (task * info["x_velocity"] if name == "halfcheetah-dir" else -abs(info["x_velocity"] - task))
        assert reward[0, 0].item() == pytest.approx(expected + info["reward_ctrl"], abs=1e-4)
        assert info["reward_ctrl"] == pytest.approx(-0.1 * 6)
        env.close()
    learner = MAMLTRPO(GaussianMLPPolicy(17, 6, hidden=(8,)), family("halfcheetah-vel"), trajectories=2, horizon=5)
    out = learner.train_step(family("halfcheetah-vel").sample_tasks(2, torch.Generator().manual_seed(0)),
                             learner.make_optimizer(1e-3))
    assert out.returns.shape == (2, 2) and torch.isfinite(out.returns).all()
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()   # its warnings became Python warnings, once each


def test_gymnasium_missing_is_one_line_naming_the_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(RuntimeError, match=r"needs gymnasium: pip install 'fastadapt\[rl\]'"):
        family("halfcheetah-dir")


def test_nothing_below_rl_imports_it():
    import ast
    from pathlib import Path
    import fastadapt
    source = Path(fastadapt.__file__).parent
    for path in source.rglob("*.py"):
        relative = path.relative_to(source).parts
        if relative[0] in ("rl", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{'.' * node.level}{node.module or ''}"] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith(("fastadapt.rl", ".rl", "..rl"))], path


# ---------------------------------------------------------------------------- runs from the command line
RL_ARGS = ["--env", "navigation-2d", "--task-batch", "3", "--trajectories", "3", "--horizon", "12", "--hidden", "8",
           "--steps", "4", "--eval-every", "2", "--log-every", "1", "--val-tasks", "3", "--test-tasks", "4",
           "--quiet", "--threads", "1"]


def _rl_records(run):
    import json
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for timing in ("time", "tasks_per_s"):
            record.pop(timing, None)
        out.append(record)
    return out


@pytest.fixture(scope="module")
def straight_rl(tmp_path_factory):
    from fastadapt.cli import main
    run = tmp_path_factory.mktemp("rl") / "run"
    assert main(["train", *RL_ARGS, "--out", str(run)]) == 0
    return run


def test_an_rl_run_trains_evaluates_and_plots_from_the_command_line(straight_rl, capsys):
    import json
    from fastadapt.cli import main
    from fastadapt.checkpoint import load_checkpoint
    run = straight_rl
    report = json.loads((run / "test.json").read_text())
    assert report["tasks"] == 4 and len(report["returns"]) == 4 and len(report["returns_ci"]) == 4
    records = _rl_records(run)
    trained = [r for r in records if "returns" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4] and all(len(r["returns"]) == 2 and "kl" in r for r in trained)
    assert load_checkpoint(run / "last.pt")["config"]["rl"]["env"] == "navigation-2d"
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 test tasks" in out and "(before adapting)" in out and "return" in out
    assert main(["eval", str(run), "--episodes", "5", "--quiet"]) == 0
    assert capsys.readouterr().out == out   # fixed, seeded test tasks and trajectories
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run)]) == 0
    assert {"learning_curves.png", "inner_steps.png", "trajectories.png"} <= {p.name for p in run.iterdir()}


def test_what_only_an_image_run_has_is_refused_on_an_rl_run_in_one_line(straight_rl, capsys):
    from fastadapt.cli import main
    run, kind = straight_rl, "is a meta-RL run (navigation-2d)"
    cases = [(["--protocol", "lake"], f"--protocol lake: {straight_rl / 'best.pt'} {kind}; protocols are image data sets'"),
             (["--tta", "4"], f"--tta: needs a classification run (class probabilities); {run / 'best.pt'} {kind}"),
             ([str(run)], f"an ensemble: needs a classification run (class probabilities); {run / 'best.pt'} {kind}"),
             (["--head", "centroid"], f"--head: {run} is a maml run, which has no heads (pretrain runs have)"),
             (["--dataset", "omniglot"], f"--dataset: {run} {kind}, whose test tasks come from its task family"),
             (["--split", "background_small2"], f"--split: {run} {kind}")]
    for extra, message in cases:
        assert main(["eval", str(run), *extra, "--episodes", "2", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_an_rl_run_stopped_by_a_signal_resumes_to_the_same_result(straight_rl, tmp_path, monkeypatch, capsys):
    import json
    import os
    import signal
    from fastadapt.cli import main
    from fastadapt.checkpoint import load_checkpoint
    from fastadapt.rl import experiment as rl_experiment

    real = rl_experiment.TaskStream.__iter__

    def signalling(stream):
        for index, batch in enumerate(real(stream)):
            if index == 2 and not signalling.fired:
                signalling.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    signalling.fired = False
    monkeypatch.setattr(rl_experiment.TaskStream, "__iter__", signalling)
    run = tmp_path / "run"
    assert main(["train", *RL_ARGS, "--out", str(run)]) == 128 + signal.SIGTERM
    assert "stopped (SIGTERM)" in capsys.readouterr().err and not (run / "test.json").exists()
    assert load_checkpoint(run / "last.pt")["step"] == 3   # the iteration under way when the signal came is finished
    assert main(["train", "--resume", str(run)]) == 0
    a, b = load_checkpoint(straight_rl / "last.pt")["model"], load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rl_records(run) == _rl_records(straight_rl)
    assert json.loads((run / "test.json").read_text())["returns"] == \
        json.loads((straight_rl / "test.json").read_text())["returns"]


def test_rl_command_line_bad_input_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    import sys
    from fastadapt.cli import main
    cases = [(["--env", "nope"], "invalid choice: 'nope' (choose from "),
             ([*RL_ARGS, "--algo", "protonet"], "--algo is 'protonet'; a meta-RL run's inner loop is one of maml, "
                                                 "metasgd"),
             ([*RL_ARGS, "--hvp-fraction", "1.5"], "--hvp-fraction must be in (0, 1], got 1.5"),
             ([*RL_ARGS, "--max-kl", "0"], "--max-kl must be a positive finite number, got 0.0"),
             ([*RL_ARGS, "--cosine"], "--cosine has no effect on a TRPO step, whose size max_kl sets"),
             ([*RL_ARGS, "--dataset", "omniglot"], "--dataset is 'omniglot' and --env is 'navigation-2d': a run's "
                                                   "tasks come from a data set or from a task family, not both"),
             (["--preset", "omniglot-minimal-20w1s", *RL_ARGS],
              "--dataset is 'omniglot' (from --preset omniglot-minimal-20w1s) and --env is 'navigation-2d'"),
             ([*RL_ARGS, "--inner-estimator", "dice"], "argument --inner-estimator: invalid choice: 'dice'")]
    for args, message in cases:
        assert main(["train", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and len([line for line in err if "warning" not in line]) == 1, err
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    assert main(["train", "--env", "halfcheetah-vel", "--steps", "1", "--out", str(tmp_path / "y")]) == 2
    assert "needs gymnasium: pip install 'fastadapt[rl]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_image_options_beside_env_are_warned_of_and_ignored(tmp_path, capsys):
    from fastadapt.cli import main, train_config
    assert main(["train", *RL_ARGS, "--steps", "1", "--n-way", "7", "--augment", "--rotations", "--drawers", "disjoint",
                 "--norm", "tasknorm", "--query-statistics", "support", "--out", str(tmp_path / "run")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    flags = ("--augment", "--drawers", "--n-way", "--norm", "--query-statistics", "--rotations")
    assert [line.split("warning: ")[1].split()[0] for line in warned] == list(flags)
    assert all("means nothing for a meta-RL run" in line and "it is ignored" in line for line in warned)
    plain, given = train_config(RL_ARGS), train_config([*RL_ARGS, "--n-way", "7", "--rotations", "--augment"])
    assert given.to_dict() == plain.to_dict()
    from fastadapt.rl.experiment import build_learner
    lvc = train_config([*RL_ARGS, "--inner-estimator", "lvc"])
    assert plain.rl.inner_estimator == "reinforce" and build_learner(lvc).learner.loss_fn.estimator == "lvc"


def test_a_diverging_rl_run_stops_with_exit_1_and_advice(tmp_path, capsys, monkeypatch):
    from fastadapt.cli import main
    from fastadapt.rl import MAMLTRPO
    real = MAMLTRPO.train_step

    def poisoned(self, batch, optimizer, **kwargs):
        out = real(self, batch, optimizer, **kwargs)
        if self.iteration == 2:
            with torch.no_grad():
                self.policy.log_std.fill_(float("nan"))
        return out

    monkeypatch.setattr(MAMLTRPO, "train_step", poisoned)
    assert main(["train", *RL_ARGS, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "diverged: the meta-parameters became non-finite at step 3" in err and "holds the last finite" in err


def test_maml_trpo_has_glibc_keep_freed_memory_once():
    import platform

    from fastadapt.rl import allocator
    MAMLTRPO(GaussianMLPPolicy(2, 2, hidden=(4,)), family("navigation-2d"))
    glibc = platform.libc_ver()[0] == "glibc"
    assert allocator._applied is glibc
    assert allocator.keep_freed_memory() is glibc  # a second call changes nothing and says the same
