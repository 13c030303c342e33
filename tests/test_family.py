"""Meta-SGD and ANIL against independently written references (float64, BatchNorm included)."""

import pytest
import torch
import torch.nn.functional as F

from fastadapt import experiment
from fastadapt.algorithms import ANIL, MetaSGD
from fastadapt.evaluate import evaluate
from fastadapt.train import Trainer
from reference import forward
from test_maml import grads_of, image_batch, small_conv4


def test_meta_sgd_gradient_matches_loop_reference_including_learned_rates():
    model, batch = small_conv4(), image_batch()
    learner = MetaSGD(model, inner_lr=0.3, inner_steps=2).double()
    with torch.no_grad():  # distinct rates, so a mix-up between weights would show
        for i, lr in enumerate(learner.inner_lrs.values()):
            lr.mul_(1 + 0.1 * i)
    out = learner.meta_loss(batch)
    params = dict(model.named_parameters())
    rates = {n: learner.inner_lrs[n.replace(".", "__")] for n in params}
    total = 0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(2):
            loss = F.cross_entropy(forward(model, fast, batch.support_x[t]), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - rates[n] * gi for (n, w), gi in zip(fast.items(), g)}
        total = total + F.cross_entropy(forward(model, fast, batch.query_x[t]), batch.query_y[t])
    reference = total / batch.num_tasks
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    everything = list(model.parameters()) + list(learner.inner_lrs.values())
    ours = torch.autograd.grad(out.loss, everything)
    theirs = torch.autograd.grad(reference, everything)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert set(learner.state_dict()) > {f"inner_lrs.{k}" for k in learner.inner_lrs}


def test_anil_adapts_only_the_head_and_matches_reference():
    model, batch = small_conv4(), image_batch()
    learner = ANIL(model, inner_lr=0.4, inner_steps=3)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    for name, p in model.named_parameters():
        if name.startswith("head."):
            assert not torch.equal(fast[name], p)
        else:
            assert torch.equal(fast[name], p)
    out = learner.meta_loss(batch, per_step=True)
    params = dict(model.named_parameters())
    head = [n for n in params if n.startswith("head.")]
    total = 0
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(3):
            loss = F.cross_entropy(forward(model, fast, batch.support_x[t]), batch.support_y[t])
            g = torch.autograd.grad(loss, [fast[n] for n in head], create_graph=True)
            fast.update({n: fast[n] - 0.4 * gi for n, gi in zip(head, g)})
        total = total + F.cross_entropy(forward(model, fast, batch.query_x[t]), batch.query_y[t])
    reference = total / batch.num_tasks
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_of(out.loss, model), grads_of(reference, model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="no submodule 'classifier'"):
        ANIL(model, head="classifier")


@pytest.mark.parametrize("algo", ["metasgd", "anil", "fomaml"])
def test_short_training_improves_on_glyphs(algo):
    c = experiment.resolve(dict(dataset="glyphs", glyph_classes=30, hidden=16, n_way=3, k_shot=1, k_query=3,
                                task_batch=4, inner_steps=1, inner_steps_test=1, inner_lr=0.4, steps=40,
                                eval_every=1000, log_every=1000, val_episodes=40, eval_batch=20, algo=algo,
                                meta_lr=3e-3))
    torch.manual_seed(0)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    before = evaluate(learner, sources["val"], 1).accuracy[-1]
    Trainer(learner, sources["train"], c).fit(progress=False)
    after = evaluate(learner, sources["val"], 1).accuracy[-1]
    assert after > before + 0.1, (before, after)
