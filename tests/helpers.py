"""What the tests share: independent references for the engine (also used by the benchmarks),
small models and task batches, the tiny command-line run, and the shared data files.

The references are written the way the widely used MAML-Pytorch code's ``Meta.forward`` is: a Python loop over the
tasks, ``torch.autograd.grad`` for the inner steps (here with ``create_graph`` for second order),
and PyTorch's own ``F.batch_norm`` in training mode (exact outside ``vmap``). Nothing here uses
fastadapt's engine.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

from fastadapt import TaskBatch
from fastadapt.data import Glyphs
from fastadapt.models import conv4

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A run of the command line that takes seconds: Glyphs, 3-way 1-shot, conv4 with 8 filters.
TINY_ARGS = ["--dataset", "glyphs", "--glyph-classes", "12", "--hidden", "8", "--n-way", "3", "--k-spt", "1",
             "--k-qry", "2", "--task-num", "2", "--update-step", "1", "--update-step-test", "2", "--epoch", "4",
             "--eval-every", "2", "--log-every", "2", "--val-episodes", "4", "--test-episodes", "4", "--quiet"]


def shared_data(relative: str) -> Path:
    """A file under ../shared/data: skipped when absent locally, a failure under CI=true."""
    path = SHARED_DATA / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {path}, which is missing")
        pytest.skip(f"{path} not present")
    return path


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_batch(tasks=3, n_way=3, shots=2, queries=3, size=8, channels=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return TaskBatch(torch.rand(tasks, n_way * shots, channels, size, size, generator=g, dtype=dtype),
                     torch.arange(n_way).repeat_interleave(shots).repeat(tasks, 1),
                     torch.rand(tasks, n_way * queries, channels, size, size, generator=g, dtype=dtype),
                     torch.randint(0, n_way, (tasks, n_way * queries), generator=g))


def small_conv4(dtype=torch.float64):
    return conv4(in_channels=1, n_way=3, hidden=4, image_size=8).to(dtype)


def grads_of(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


class SignalAt:
    """Wraps a task source or a list of fixed tasks: sends ``sig`` to this process when item ``n``
    is drawn, once per test (the resumed run draws again without a signal)."""

    fired = False

    def __init__(self, items, n, sig):
        self.items, self.n, self.sig = items, n, sig

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.n and not SignalAt.fired:
                SignalAt.fired = True
                os.kill(os.getpid(), self.sig)
            yield item

    def __len__(self):
        return len(self.items)

    def __getattr__(self, name):  # state_dict, load_state_dict, dataset
        return getattr(self.items, name)


class InterruptAfter:
    """A task source that raises KeyboardInterrupt on draw number ``n + 1``."""

    def __init__(self, tasks, n):
        self.tasks, self.n = tasks, n

    def __iter__(self):
        for i, batch in enumerate(self.tasks):
            if i == self.n:
                raise KeyboardInterrupt
            yield batch

    def state_dict(self):
        return self.tasks.state_dict()

    def load_state_dict(self, state):
        self.tasks.load_state_dict(state)


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

    Like the reference code, every step's query loss is computed with the graph kept (it sums them into
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
    """The reference code's ``finetunning``: deep-copy the network per task, adapt, score every step."""
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


def glyph_files(folder, shots=(1, 1, 1), queries=2, inverted=True):
    """Glyphs test characters as PNG files: dark strokes on white (as Omniglot's files) unless
    ``inverted=False``. ``shots``: support images per class."""
    glyphs = Glyphs(num_classes=len(shots), examples_per_class=max(shots) + queries, split="test")
    per_class = max(shots) + queries
    for c, k in enumerate(shots):
        for e in range(per_class):
            image = glyphs.images[c * per_class + e, 0].numpy()
            image = 255 - image if inverted else image
            if e < k:
                write_png(folder / "support" / f"c{c}" / f"{e}.png", image)
            elif e >= max(shots):
                write_png(folder / "query" / f"c{c}_{e}.png", image)
    return folder / "support", folder / "query"
