"""MAML++ per-step BatchNorm: weights against a loop reference, recorded statistics, running mode."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from fastadapt import MAMLPlusPlus
from helpers import TINY_ARGS, forward, image_batch, small_conv4, write_png


def bn_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def with_step_bn(model, learner, fast, step):
    """The weights of the pass at ``step``: the model's own BatchNorm weights at step 0, the
    learner's row ``step - 1`` after, clamped to the trained steps."""
    row = min(step, learner.inner_steps - 1)
    if row == 0:
        return fast
    out = dict(fast)
    for index, name in enumerate(bn_names(model)):
        out[f"{name}.weight"] = learner.bn_step_weights[index][row - 1]
        out[f"{name}.bias"] = learner.bn_step_biases[index][row - 1]
    return out


def running_forward(model, learner, params, x, step):
    """``model`` in eval mode (BatchNorm normalises with running statistics), given step ``step``'s
    recorded rows as its running statistics."""
    row = min(step, learner.inner_steps - 1)
    statistics = {}
    for index, name in enumerate(bn_names(model)):
        statistics[f"{name}.running_mean"] = learner.get_buffer(f"bn_running_mean_{index}")[row]
        statistics[f"{name}.running_var"] = learner.get_buffer(f"bn_running_var_{index}")[row]
    model.eval()
    try:
        return functional_call(model, {**params, **statistics}, (x,))
    finally:
        model.train()


def reference_meta_loss(model, learner, batch, inner_lr, steps, running=False):
    """Loop over tasks with autograd.grad(create_graph=True); BatchNorm weights are never updated."""
    names = [n for n in dict(model.named_parameters()) if n.rpartition(".")[0] not in bn_names(model)]

    def at(view, x, step):
        return running_forward(model, learner, view, x, step) if running else forward(model, view, x)

    total = 0
    for t in range(batch.num_tasks):
        fast = dict(model.named_parameters())
        for step in range(steps):
            view = with_step_bn(model, learner, fast, step)
            loss = F.cross_entropy(at(view, batch.support_x[t], step), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast = {**fast, **{n: fast[n] - inner_lr * g for n, g in zip(names, grads)}}
        query = at(with_step_bn(model, learner, fast, steps - 1), batch.query_x[t], steps - 1)
        total = total + F.cross_entropy(query, batch.query_y[t]) / batch.num_tasks
    return total


def test_per_step_batch_norm_weights_match_a_second_order_loop_reference():
    model, batch = small_conv4(), image_batch()
    learner = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=3, per_step_bn=True).double()
    with torch.no_grad():  # make every step's BatchNorm weights different
        for table in [*learner.bn_step_weights, *learner.bn_step_biases]:
            table.add_(torch.randn_like(table) * 0.3)
    out = learner.meta_loss(batch)
    reference = reference_meta_loss(model, learner, batch, 0.3, 3)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    everything = list(learner.parameters())
    assert len(everything) == len(list(model.parameters())) + 2 * len(bn_names(model))
    ours, theirs = torch.autograd.grad(out.loss, everything), torch.autograd.grad(reference, everything)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in ours)  # every step's table takes part


def test_meta_training_in_running_mode_normalises_every_pass_with_the_recorded_statistics():
    """Non-transductive meta-training (``bn_statistics="running"`` while training): the statistics
    are recorded first, then every support and query pass, and their second-order meta-gradient,
    use step s's recorded rows, as a model in eval mode would."""
    model, batch = small_conv4(), image_batch()
    learner = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=3, per_step_bn=True, bn_statistics="running").double()
    with torch.no_grad():
        for table in [*learner.bn_step_weights, *learner.bn_step_biases]:
            table.add_(torch.randn_like(table) * 0.3)
    learner.meta_backward(batch)
    recorded = {n: b.clone() for n, b in learner.named_buffers()}
    out = learner.meta_loss(batch)  # records once more, then scores
    assert all(not torch.equal(b, recorded[n]) for n, b in learner.named_buffers() if n.startswith("bn_running"))
    reference = reference_meta_loss(model, learner, batch, 0.3, 3, running=True)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    transductive = reference_meta_loss(model, learner, batch, 0.3, 3)
    assert (out.loss - transductive).abs() > 1e-3  # not the batch-statistics loss
    everything = list(learner.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, everything), torch.autograd.grad(reference, everything)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_running_statistics_are_recorded_per_step_while_meta_training_only():
    model, batch = small_conv4(), image_batch()
    learner = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, per_step_bn=True, task_chunk=None).double()
    inputs = []
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
             for m in model.modules() if isinstance(m, _BatchNorm)]
    layers = len(hooks)
    expected_mean = [torch.zeros(2, m.num_features, dtype=torch.float64) for m in model.modules()
                     if isinstance(m, _BatchNorm)]
    expected_var = [torch.zeros_like(m) for m in expected_mean]
    def record(view, x, step, t):
        """Half of row ``step``'s statistics: this pass's, averaged over the tasks."""
        inputs.clear()
        with torch.no_grad():
            forward(model, view, x)
        for i, found in enumerate(inputs[:layers]):
            var, mean = torch.var_mean(found, dim=(0, 2, 3), correction=1)
            expected_mean[i][step] += mean / batch.num_tasks / 2
            expected_var[i][step] += var / batch.num_tasks / 2

    # first-order steps; row s: the support pass at step s and the query pass scoring the weights
    # after step s + 1, which uses row s too
    for t in range(batch.num_tasks):
        fast = {n: w.detach() for n, w in model.named_parameters()}
        for step in range(2):
            record(with_step_bn(model, learner, fast, step), batch.support_x[t], step, t)
            params = {n: w.requires_grad_() for n, w in fast.items()}
            grads = torch.autograd.grad(F.cross_entropy(forward(model, with_step_bn(model, learner, params, step),
                                                                batch.support_x[t]), batch.support_y[t]),
                                        list(params.values()), allow_unused=True)
            fast = {n: (w - 0.3 * g).detach() if n.rpartition(".")[0] not in bn_names(model) else w.detach()
                    for (n, w), g in zip(params.items(), grads)}
            record(with_step_bn(model, learner, fast, step), batch.query_x[t], step, t)
    for h in hooks:
        h.remove()
    learner.meta_backward(batch)
    for i in range(layers):
        torch.testing.assert_close(learner.get_buffer(f"bn_running_mean_{i}"), 0.1 * expected_mean[i])
        torch.testing.assert_close(learner.get_buffer(f"bn_running_var_{i}"), 0.9 + 0.1 * expected_var[i])
    before = {n: b.clone() for n, b in learner.named_buffers()}
    learner.fine_tune(batch, inner_steps=3)
    learner.adapt(batch.support_x[0], batch.support_y[0])
    learner.eval()
    learner.meta_loss(batch)
    for name, value in learner.named_buffers():
        assert torch.equal(value, before[name]), name


def test_running_mode_classifies_one_image_as_in_a_batch_and_touches_nothing():
    model, batch = small_conv4(), image_batch()
    learner = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, per_step_bn=True).double()
    for _ in range(3):
        learner.meta_backward(batch)
    learner.zero_grad()
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    alone = learner.predict(fast, batch.query_x[0][:2])
    in_batch = learner.predict(fast, batch.query_x[0])[:2]
    assert (alone - in_batch).abs().max() > 1e-6  # transductive by default
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        learner.predict(fast, batch.query_x[0][:1])  # nothing to normalise one 1x1 map with
    learner.bn_statistics = "running"
    state = {n: t.clone() for n, t in learner.state_dict().items()}
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(learner.predict(fast, batch.query_x[0][:1]), learner.predict(fast, batch.query_x[0])[:1])
    torch.testing.assert_close(learner(batch.query_x[0][:1]), learner(batch.query_x[0])[:1])
    scores = learner.fine_tune(batch, inner_steps=4)  # more steps than trained: the last row is reused
    assert scores.query_accuracy.shape == (5,)
    for name, value in learner.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_per_step_bn_needs_batch_norm_and_running_mode_needs_per_step_bn():
    from fastadapt.models import mlp
    with pytest.raises(ValueError, match="no BatchNorm"):
        MAMLPlusPlus(mlp(), per_step_bn=True)
    with pytest.raises(ValueError, match="needs per_step_bn"):
        MAMLPlusPlus(small_conv4(), bn_statistics="running")
    with pytest.raises(ValueError, match="'batch' or 'running'"):
        MAMLPlusPlus(small_conv4(), per_step_bn=True, bn_statistics="moving")


def test_cli_mamlpp_trains_with_per_step_bn_and_predicts_one_image_at_a_time(tmp_path, capsys):
    import numpy as np
    from fastadapt.checkpoint import load_checkpoint
    from fastadapt.cli import main
    from fastadapt.data import Glyphs

    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--algo", "mamlpp", "--update-step", "2", "--out", str(run)]) == 0
    state = load_checkpoint(run)
    assert "bn_step_weights.0" in state["model"] and state["model"]["bn_running_var_0"].shape[0] == 2
    assert not torch.equal(state["model"]["bn_running_var_0"], torch.ones_like(state["model"]["bn_running_var_0"]))
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "4", "--bn-statistics", "running"]) == 0
    assert "4 test tasks" in capsys.readouterr().out
    glyphs = Glyphs(num_classes=3, examples_per_class=2, split="test")
    for c in range(3):
        write_png(tmp_path / "support" / f"class{c}" / "0.png", 255 - glyphs.images[2 * c, 0].numpy())
    write_png(tmp_path / "query" / "q.png", np.full((28, 28), 200, dtype=np.uint8))
    assert main(["predict", str(run), "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                 "--bn-statistics", "running"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split(",")[1] in ("class0", "class1", "class2")
    assert main(["train", *TINY_ARGS, "--bn-statistics", "running", "--out", str(tmp_path / "x")]) == 2
    assert "--bn-statistics is 'running', which" in capsys.readouterr().err
