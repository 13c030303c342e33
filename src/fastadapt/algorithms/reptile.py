"""Reptile (Nichol, Achiam and Schulman, 2018): move the initialisation towards adapted weights."""

from __future__ import annotations

import torch

from ..config import Option
from .engine import MetaLearner, MetaOutput


class Reptile(MetaLearner):
    """Each task takes ``inner_steps`` steps of SGD (or Adam, ``inner_optimizer="adam"``) on its
    support set; the meta-update is ``theta += outer_lr * mean_tasks(phi - theta)``.

    There is no meta-gradient, so Reptile has its own ``train_step``: it adapts every task
    (vectorised chunks, no graph), writes the direction ``theta - mean(phi)`` into ``.grad`` and
    steps the plain SGD at ``outer_lr`` that ``make_optimizer`` returns, which is exactly that
    update and lets the Trainer's cosine schedule anneal ``outer_lr`` (the paper anneals it
    linearly) and checkpoint it like any optimiser. ``before_update`` sees the direction in
    ``.grad`` (the Trainer averages it over processes there).
    """

    name = "reptile"
    summary = "Reptile (Nichol et al. 2018)"
    ignores = {"first_order": "it never differentiates through the inner loop",
               "meta_lr": "its outer step size is --outer-lr"}
    options = (Option("outer_lr", float, "Reptile's outer step size (default 1.0)", positive=True),
               Option("inner_optimizer", str, "Reptile's inner optimiser (default sgd)", choices=("sgd", "adam")))

    @classmethod
    def from_config(cls, model, config):
        a = config.algorithm
        own = {o.name: a.options[o.name] for o in cls.options if a.options.get(o.name) is not None}
        return cls(model, a.inner_lr, a.inner_steps, loss=config.loss, task_chunk=a.task_chunk, compile=a.compile,
                   **own)

    def __init__(self, model, inner_lr: float = 0.1, inner_steps: int = 5, outer_lr: float = 1.0,
                 inner_optimizer: str = "sgd", loss="cross_entropy", task_chunk="auto", compile: bool = False,
                 betas=(0.0, 0.999), eps: float = 1e-8, classification=None):
        super().__init__(model, inner_steps=inner_steps, loss=loss, task_chunk=task_chunk, compile=compile,
                         classification=classification)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if not inner_lr > 0 or not outer_lr > 0:
            raise ValueError(f"inner_lr and outer_lr must be positive, got {inner_lr!r}, {outer_lr!r}")
        self.inner_lr, self.outer_lr = float(inner_lr), float(outer_lr)
        self.inner_optimizer, self.betas, self.eps = inner_optimizer, betas, eps

    def create_graph(self) -> bool:
        return False

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield fast
        first, second = {}, {}
        b1, b2 = self.betas
        for step in range(1, steps + 1):
            grads = self.support_grad(fast, buffers, support_x, support_y, create_graph=False)
            if self.inner_optimizer == "sgd":
                fast = {n: w - self.inner_lr * grads[n] for n, w in fast.items()}
            else:
                first = {n: b1 * first.get(n, 0) + (1 - b1) * g for n, g in grads.items()}
                second = {n: b2 * second.get(n, 0) + (1 - b2) * g * g for n, g in grads.items()}
                fast = {n: w - self.inner_lr * (first[n] / (1 - b1 ** step))
                        / ((second[n] / (1 - b2 ** step)).sqrt() + self.eps) for n, w in fast.items()}
            yield fast

    def meta_loss(self, batch, per_step: bool = False) -> MetaOutput:
        raise NotImplementedError("Reptile has no differentiable meta-loss; train_step(batch, optimizer) takes its step")

    def meta_backward(self, batch, per_step: bool = False) -> MetaOutput:
        raise NotImplementedError("Reptile has no meta-gradient; train_step(batch, optimizer) takes its step")

    def train_step(self, batch, optimizer, *, per_step: bool = False, clip_grad=None, before_update=None):
        out, fast = self.adapt_tasks(batch, self.inner_steps, per_step=per_step)
        for name, p in self.model.named_parameters():
            p.grad = p.detach() - fast[name].mean(0)
        return self.apply_update(out, optimizer, clip_grad, before_update)

    def make_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.outer_lr)
