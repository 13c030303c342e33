"""The MAML engine against independent references (float64, BatchNorm included)."""

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt import MAML, TaskBatch
from fastadapt.algorithms import ProtoNet
from fastadapt.models import Learner, mlp
from helpers import deepcopy_fine_tune, forward, grads_of, image_batch, loop_meta_loss, small_conv4


def bn_mlp(dtype=torch.float64):
    return Learner([("linear", [8, 2]), ("bn", [8]), ("relu", [True]), ("linear", [8, 8]),
                    ("bn", [8]), ("tanh", []), ("linear", [3, 8])]).to(dtype)


def vector_batch(tasks=3, n_way=3, shots=2, queries=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return TaskBatch(torch.randn(tasks, n_way * shots, 2, generator=g, dtype=dtype),
                     torch.arange(n_way).repeat_interleave(shots).repeat(tasks, 1),
                     torch.randn(tasks, n_way * queries, 2, generator=g, dtype=dtype),
                     torch.randint(0, n_way, (tasks, n_way * queries), generator=g))


CASES = {"conv4": (small_conv4, image_batch), "mlp_bn": (bn_mlp, vector_batch)}


def assert_all_close(a, b, rtol, atol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("task_chunk, vmap_query", [(None, True), (2, False)])
def test_second_order_matches_loop_reference(case, task_chunk, vmap_query):
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    maml = MAML(model, inner_lr=0.4, inner_steps=3, task_chunk=task_chunk)
    maml.vmap_query = vmap_query
    out = maml.meta_loss(batch, per_step=True)
    ref_loss, ref_acc = loop_meta_loss(model, batch, 0.4, 3, create_graph=True)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.query_accuracy, ref_acc.to(out.query_accuracy.dtype))
    assert_all_close(grads_of(out.loss, model), grads_of(ref_loss, model), rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_second_order_matches_finite_differences(case):
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    maml = MAML(model, inner_lr=0.4, inner_steps=2)
    grads = grads_of(maml.meta_loss(batch).loss, model)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    h = 1e-6  # the meta-loss of this tiny BatchNorm net bends sharply: larger steps cross ReLU kinks
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
            plus = maml.meta_loss(batch).loss
            for p, d in zip(params, direction):
                p.sub_(2 * h * d)
            minus = maml.meta_loss(batch).loss
            for p, d in zip(params, direction):
                p.add_(h * d)
        numeric = (plus - minus) / (2 * h)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_first_order_is_stop_gradient_formula_and_differs_from_second_order(case):
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    steps, lr = 3, 0.4
    first = grads_of(MAML(model, inner_lr=lr, inner_steps=steps, first_order=True).meta_loss(batch).loss, model)
    second = grads_of(MAML(model, inner_lr=lr, inner_steps=steps).meta_loss(batch).loss, model)

    # FOMAML: the gradient of each task's query loss w.r.t. its adapted weights, averaged.
    names = [n for n, _ in model.named_parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(batch.num_tasks):
        fast = {n: p.detach() for n, p in model.named_parameters()}
        for _ in range(steps):
            fast = {n: w.requires_grad_() for n, w in fast.items()}
            loss = F.cross_entropy(forward(model, fast, batch.support_x[i]), batch.support_y[i])
            g = torch.autograd.grad(loss, [fast[n] for n in names])
            fast = {n: (fast[n] - lr * gi).detach() for n, gi in zip(names, g)}
        fast = {n: w.requires_grad_() for n, w in fast.items()}
        q = F.cross_entropy(forward(model, fast, batch.query_x[i]), batch.query_y[i])
        for e, gi in zip(expected, torch.autograd.grad(q, [fast[n] for n in names])):
            e += gi / batch.num_tasks
    assert_all_close(first, expected, rtol=1e-8)
    difference = max((a - b).abs().max().item() for a, b in zip(first, second))
    scale = max(b.abs().max().item() for b in second)
    assert difference > 1e-3 * scale


@pytest.mark.parametrize("task_chunk", [None, 1, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vmap_query", [False, True])
def test_vmapped_batch_equals_loop_over_its_tasks(task_chunk, first_order, vmap_query):
    model, batch = small_conv4(), image_batch(tasks=5)
    maml = MAML(model, inner_steps=2, first_order=first_order, task_chunk=task_chunk)
    maml.vmap_query = vmap_query
    out = maml.meta_loss(batch, per_step=True)
    grads = grads_of(out.loss, model)
    single = [MAML(model, inner_steps=2, first_order=first_order).meta_loss(batch[i], per_step=True)
              for i in range(batch.num_tasks)]
    loop_loss = sum(o.loss for o in single) / batch.num_tasks
    torch.testing.assert_close(out.loss, loop_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.query_accuracy, torch.stack([o.query_accuracy for o in single]).mean(0))
    torch.testing.assert_close(out.task_accuracy, torch.cat([o.task_accuracy for o in single]))
    assert_all_close(grads, grads_of(loop_loss, model), rtol=1e-8)


def test_meta_backward_accumulates_the_meta_loss_gradient():
    model, batch = small_conv4(), image_batch(tasks=5)
    maml = MAML(model, inner_steps=2, task_chunk=2)
    expected = grads_of(maml.meta_loss(batch).loss, model)
    out = maml.meta_backward(batch)
    assert not out.loss.requires_grad
    assert_all_close([p.grad for p in model.parameters()], expected, rtol=1e-8)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_adapt_predict_fine_tune_leave_parameters_and_buffers_bit_identical():
    model, batch = small_conv4(torch.float32), image_batch(dtype=torch.float32)
    maml = MAML(model, inner_steps=3)
    before = snapshot(model)
    fast = maml.adapt(batch.support_x[0], batch.support_y[0])
    maml.predict(fast, batch.query_x[0]).sum().backward()
    batched = maml.adapt(batch.support_x, batch.support_y)
    maml.predict(batched, batch.query_x)
    maml.fine_tune(batch, inner_steps=4)
    maml.meta_loss(batch, per_step=True)
    assert_unchanged(model, before)
    assert model.features[1].num_batches_tracked.item() == 0


def test_adapt_single_and_batched_agree_and_predict_shapes():
    model, batch = small_conv4(), image_batch()
    maml = MAML(model, inner_steps=2)
    batched = maml.adapt(batch.support_x, batch.support_y)
    for name, p in model.named_parameters():
        assert batched[name].shape == (batch.num_tasks, *p.shape)
    one = maml.adapt(batch.support_x[1], batch.support_y[1])
    for name in one:
        torch.testing.assert_close(one[name], batched[name][1])
    assert maml.predict(batched, batch.query_x).shape == (3, 9, 3)
    assert maml.predict(one, batch.query_x[1]).shape == (9, 3)
    # adapt is differentiable w.r.t. the meta-parameters (second order)
    loss = F.cross_entropy(maml.predict(one, batch.query_x[1]), batch.query_y[1])
    ref = loop_meta_loss(model, batch[1], 0.4, 2, create_graph=True)[0]
    assert_all_close(grads_of(loss, model), grads_of(ref, model), rtol=1e-6)


def test_fine_tune_matches_deepcopy_reference():
    model, batch = small_conv4(), image_batch(tasks=4)
    maml = MAML(model, inner_lr=0.4, inner_steps=1, task_chunk=3)
    out = maml.fine_tune(batch, inner_steps=4)
    ref = deepcopy_fine_tune(model, batch, 0.4, 4)
    torch.testing.assert_close(out.task_accuracy, ref.to(out.task_accuracy.dtype))
    assert out.query_accuracy.shape == (5,) and out.query_loss.shape == (5,)
    assert not out.loss.requires_grad


def test_float32_matches_float64_closely():
    model64, batch = small_conv4(), image_batch()
    model32 = small_conv4(torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    l64 = MAML(model64, inner_lr=0.1, inner_steps=2).meta_loss(batch).loss
    l32 = MAML(model32, inner_lr=0.1, inner_steps=2).meta_loss(batch.to(dtype=torch.float32)).loss
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-5)


def test_regression_per_step_loss_and_no_accuracy():
    maml = MAML(mlp(), inner_lr=0.01, inner_steps=2, loss="mse")
    out = maml.meta_loss(fastadapt.Sinusoid(seed=1).sample(4), per_step=True)
    assert out.query_accuracy is None and out.task_accuracy is None
    assert out.query_loss.shape == (3,) and out.task_loss.shape == (4, 3)
    torch.testing.assert_close(out.query_loss[-1], out.loss.detach())


@pytest.mark.parametrize("kwargs, message", [
    ({"inner_lr": 0}, "inner_lr"),
    ({"inner_steps": -1}, "inner_steps"),
    ({"loss": "hinge"}, "loss"),
    ({"task_chunk": 0}, "task_chunk"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAML(mlp(), **kwargs)


def test_task_batch_validates_shapes_and_moves():
    with pytest.raises(ValueError, match="leading task axis"):
        TaskBatch(torch.zeros(2, 5, 1), torch.zeros(3, 5, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="support_x"):
        TaskBatch(torch.zeros(2, 5, 1), torch.zeros(2, 4, 1), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1))
    batch = image_batch(dtype=torch.float32).to("cpu", dtype=torch.float64)
    assert batch.support_x.dtype == torch.float64 and batch.support_y.dtype == torch.int64


def test_sinusoid_is_reproducible_and_in_range():
    a, b = fastadapt.Sinusoid(k_shot=5, k_query=7, seed=4), fastadapt.Sinusoid(k_shot=5, k_query=7, seed=4)
    x, y = a.sample(6), b.sample(6)
    assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y)
    assert x.support_x.shape == (6, 5, 1) and x.query_y.shape == (6, 7, 1)
    assert not torch.equal(a.sample(6).support_x, x.support_x)
    assert x.support_x.abs().max() <= 5.0
    amp, phase = a.last_amplitude, a.last_phase
    assert ((amp >= 0.1) & (amp <= 5.0)).all() and ((phase >= 0) & (phase <= torch.pi)).all()


def test_sinusoid_meta_training_halves_post_adaptation_error():
    torch.manual_seed(0)
    maml = MAML(mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    test_tasks = fastadapt.Sinusoid(seed=123).sample(200)
    before = maml.fine_tune(test_tasks, inner_steps=1).loss.item()
    tasks = fastadapt.Sinusoid(seed=0)
    optimizer = torch.optim.Adam(maml.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        maml.meta_backward(tasks.sample(25))
        optimizer.step()
    after = maml.fine_tune(test_tasks, inner_steps=1).loss.item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """compile=True gives the same loss and gradients, BatchNorm included (compiling takes minutes)."""
    model, batch = small_conv4(), image_batch()
    compiled = MAML(model, inner_lr=0.4, inner_steps=2, compile=True).meta_loss(batch).loss
    eager = MAML(model, inner_lr=0.4, inner_steps=2).meta_loss(batch).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    assert_all_close(grads_of(compiled, model), grads_of(eager, model), rtol=1e-6)


def test_a_deep_copy_of_a_used_learner_runs_its_own_model():
    """The engine caches its vmapped functions, bound to the learner that built them: a copy made
    after use (an ensemble's member, a snapshot) must build its own, not run the original's."""
    import copy

    for learner in (MAML(small_conv4(), inner_lr=0.4, inner_steps=2), ProtoNet(small_conv4(), n_way=3)):
        batch = image_batch()
        before = learner.fine_tune(batch, inner_steps=2).task_loss
        twin = copy.deepcopy(learner)
        with torch.no_grad():
            for p in learner.parameters():
                p.mul_(0.5)
        torch.testing.assert_close(twin.fine_tune(batch, inner_steps=2).task_loss, before, rtol=0, atol=0)
        assert not torch.allclose(learner.fine_tune(batch, inner_steps=2).task_loss, before)
