"""Independent references for the engine's tests and benchmarks.

Written the way the widely used MAML-Pytorch code's ``Meta.forward`` is: a Python loop over the
tasks, ``torch.autograd.grad`` for the inner steps (here with ``create_graph`` for second order),
and PyTorch's own ``F.batch_norm`` in training mode (exact outside ``vmap``). Nothing here uses
fastadapt's engine.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call


def forward(model, params, x):
    """``model`` with ``params``; BatchNorm uses batch statistics on scratch running buffers."""
    scratch = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        return functional_call(model, {**params, **scratch}, (x,))
    finally:
        model.train(was_training)


def loop_meta_loss(model, batch, inner_lr, steps, create_graph, loss_fn=F.cross_entropy, per_step=True):
    """Mean final query loss over tasks, and per-step query accuracies (when classifying).

    Like the seed, every step's query loss is computed with the graph kept (the seed sums them into
    ``losses_q``), so this is also the loop that the benchmark times.
    """
    params = dict(model.named_parameters())
    names = list(params)
    total = 0.0
    correct = torch.zeros(steps + 1, device=batch.query_x.device)
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        fast = params
        for step in range(steps + 1):
            if per_step or step == steps:
                logits_q = forward(model, fast, qx)
                loss_q = loss_fn(logits_q, qy)
                if loss_fn is F.cross_entropy:
                    with torch.no_grad():
                        correct[step] += (logits_q.argmax(-1) == qy).float().mean()
            if step == steps:
                break
            loss = loss_fn(forward(model, fast, sx), sy)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
            fast = {n: fast[n] - inner_lr * g for n, g in zip(names, grads)}
        total = total + loss_q
    return total / batch.num_tasks, correct / batch.num_tasks


def deepcopy_fine_tune(model, batch, inner_lr, steps):
    """The seed's ``finetunning``: deep-copy the network per task, adapt, score every step."""
    accuracies = torch.zeros(batch.num_tasks, steps + 1)
    for i in range(batch.num_tasks):
        net = copy.deepcopy(model)
        net.train()
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        params = dict(net.named_parameters())
        fast = params
        for step in range(steps + 1):
            with torch.no_grad():
                accuracies[i, step] = (forward(net, fast, qx).argmax(-1) == qy).float().mean()
            if step == steps:
                break
            grads = torch.autograd.grad(F.cross_entropy(forward(net, fast, sx), sy), list(fast.values()))
            fast = {n: w - inner_lr * g for (n, w), g in zip(fast.items(), grads)}
        del net
    return accuracies
