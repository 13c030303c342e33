"""Meta-SGD and ANIL against independently written references (float64, BatchNorm included)."""

import pytest
import torch
import torch.nn.functional as F

from fastadapt import experiment
from fastadapt.algorithms import ANIL, MAMLPlusPlus, MetaSGD
from fastadapt.evaluate import evaluate
from fastadapt.train import Trainer
from helpers import TINY_ARGS, forward, grads_of, image_batch, small_conv4, write_png


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


# Reptile learns slowly from a single inner step (it is then joint training): give it five.
OVERRIDES = {"reptile": dict(inner_steps=5, inner_lr=0.05, outer_lr=1.0)}


@pytest.mark.parametrize("algo", ["metasgd", "anil", "fomaml", "reptile", "protonet", "mamlpp"])
def test_short_training_improves_on_glyphs(algo):
    """Accuracy after one adaptation step, on held-out Glyphs classes, before and after 40 steps."""
    settings = dict(dataset="glyphs", glyph_classes=30, hidden=16, n_way=3, k_shot=1, k_query=3, task_batch=4,
                    inner_steps=1, inner_steps_test=1, inner_lr=0.4, steps=40, eval_every=1000, log_every=1000,
                    val_episodes=40, eval_batch=20, algo=algo, meta_lr=3e-3)
    c = experiment.resolve({**settings, **OVERRIDES.get(algo, {})})
    torch.manual_seed(0)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    before = evaluate(learner, sources["val"], 1).accuracy[-1]
    Trainer(learner, sources["train"], c).fit(progress=False)
    after = evaluate(learner, sources["val"], 1).accuracy[-1]
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_reptile_update_is_step_size_times_mean_adapted_minus_initial(inner):
    import copy
    from fastadapt.algorithms import Reptile
    model, batch = small_conv4(), image_batch()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_delta = {n: torch.zeros_like(p) for n, p in initial.items()}
    for t in range(batch.num_tasks):
        net = copy.deepcopy(model)
        optimizer = (torch.optim.SGD(net.parameters(), lr=0.05) if inner == "sgd"
                     else torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.0, 0.999)))
        for _ in range(3):
            optimizer.zero_grad()
            params = dict(net.named_parameters())
            F.cross_entropy(forward(net, params, batch.support_x[t]), batch.support_y[t]).backward()
            optimizer.step()
        for n, p in net.named_parameters():
            expected_delta[n] += (p.detach() - initial[n]) / batch.num_tasks
    learner = Reptile(model, inner_lr=0.05, inner_steps=3, outer_lr=0.7, inner_optimizer=inner)
    optimizer = learner.make_optimizer(meta_lr=123.0)
    out = learner.train_step(batch, optimizer, per_step=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), initial[n] + 0.7 * expected_delta[n], rtol=1e-7, atol=1e-10)
    assert out.query_accuracy.shape == (4,)
    with pytest.raises(NotImplementedError):
        learner.meta_loss(batch)
    with pytest.raises(NotImplementedError, match="train_step"):
        learner.meta_backward(batch)


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    from fastadapt.algorithms import ProtoNet
    model, batch = small_conv4(), image_batch()
    learner = ProtoNet(model, n_way=3)
    features = model.features
    params = dict(features.named_parameters())
    total = 0
    for t in range(batch.num_tasks):
        z_support = forward(features, params, batch.support_x[t])
        z_query = forward(features, params, batch.query_x[t])
        prototypes = torch.stack([z_support[batch.support_y[t] == c].mean(0) for c in range(3)])
        logits = -torch.cdist(z_query, prototypes) ** 2
        adapted = learner.adapt(batch.support_x[t], batch.support_y[t])
        torch.testing.assert_close(learner.predict(adapted, batch.query_x[t]), logits, rtol=1e-9, atol=1e-10)
        total = total + F.cross_entropy(logits, batch.query_y[t])
    reference = total / batch.num_tasks
    out = learner.meta_loss(batch)
    torch.testing.assert_close(out.loss, reference, rtol=1e-9, atol=1e-12)
    ours = torch.autograd.grad(out.loss, list(features.parameters()))
    theirs = torch.autograd.grad(reference, list(features.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    scores = learner.fine_tune(batch, inner_steps=2)
    assert torch.equal(scores.query_accuracy[0], scores.query_accuracy[-1])


def per_step_reference(model, batch, rates, steps, create_graph=True):
    """Loop reference: the query loss after each step 1..steps, averaged over tasks.
    ``rates(step, index)`` is the inner learning rate of parameter tensor ``index`` at ``step``."""
    params = dict(model.named_parameters())
    totals = [0] * steps
    for t in range(batch.num_tasks):
        fast = params
        for step in range(steps):
            loss = F.cross_entropy(forward(model, fast, batch.support_x[t]), batch.support_y[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = {n: w - rates(step, j) * gi for j, ((n, w), gi) in enumerate(zip(fast.items(), g))}
            query = F.cross_entropy(forward(model, fast, batch.query_x[t]), batch.query_y[t])
            totals[step] = totals[step] + query / batch.num_tasks
    return totals


def test_maml_plus_plus_lslr_and_multi_step_loss_match_reference():
    model, batch = small_conv4(), image_batch()
    learner = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=3, lslr=True, multi_step_loss=10).double()
    with torch.no_grad():
        learner.step_lrs.mul_(torch.linspace(0.5, 1.5, learner.step_lrs.numel()).view_as(learner.step_lrs))
    learner.on_step(4)
    weights = learner.step_loss_weights(3)
    # 40% through the annealing: earlier steps 0.6/3 each, the last 1/3 + 0.4 * 2/3
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64))
    out = learner.meta_loss(batch)
    per_step = per_step_reference(model, batch, lambda s, j: learner.step_lrs[s, j], 3)
    reference = sum(w * loss for w, loss in zip(weights, per_step))
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    everything = list(model.parameters()) + [learner.step_lrs]
    for a, b in zip(torch.autograd.grad(out.loss, everything), torch.autograd.grad(reference, everything)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    learner.on_step(1000)
    assert learner.step_loss_weights(3)[-1].item() == pytest.approx(1 - 2 * 0.01)


def test_derivative_order_annealing_switches_from_first_to_second_order():
    from fastadapt import MAML
    model, batch = small_conv4(), image_batch()
    annealed = MAMLPlusPlus(model, inner_lr=0.4, inner_steps=2, first_order_until=5)
    first = grads_of(MAML(model, inner_lr=0.4, inner_steps=2, first_order=True).meta_loss(batch).loss, model)
    second = grads_of(MAML(model, inner_lr=0.4, inner_steps=2).meta_loss(batch).loss, model)
    annealed.on_step(4)
    for a, b in zip(grads_of(annealed.meta_loss(batch).loss, model), first):
        torch.testing.assert_close(a, b)
    annealed.on_step(5)
    for a, b in zip(grads_of(annealed.meta_loss(batch).loss, model), second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "mamlpp", "metasgd", "anil", "reptile", "protonet"])
def test_every_algorithm_trains_evaluates_and_predicts_from_the_command_line(algo, tmp_path, capsys):
    from fastadapt.checkpoint import load_checkpoint
    from fastadapt.cli import main
    from fastadapt.data import Glyphs

    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--epoch", "2", "--algo", algo, "--out", str(run)]) == 0
    assert load_checkpoint(run)["config"]["algorithm"]["name"] == algo
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    assert "2 test tasks" in capsys.readouterr().out
    glyphs = Glyphs(num_classes=3, examples_per_class=2, split="test")
    for c in range(3):
        for e in range(2):
            write_png(tmp_path / ("support" if e == 0 else "query") / f"c{c}" / f"{e}.png",
                      255 - glyphs.images[2 * c + e, 0].numpy())
    assert main(["predict", str(run), "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(lines) == 3 and all(line.split(",")[1] in {"c0", "c1", "c2"} for line in lines)
