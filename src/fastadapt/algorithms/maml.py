"""MAML (Finn, Abbeel and Levine, ICML 2017), first-order MAML, and the MAML++ options."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import MetaLearner


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning.

    Each task takes ``inner_steps`` SGD steps of size ``inner_lr`` on its support set, starting from
    the meta-parameters; the meta-loss is the query loss of the adapted weights. With
    ``first_order=False`` (default) the meta-gradient differentiates through the inner steps
    (second order); ``first_order=True`` treats the inner gradients as constants (FOMAML).

    MAML++ (Antoniou, Edwards and Storkey, ICLR 2019) options, each usable alone:

    - ``multi_step_loss=N``: the meta-loss weighs the query loss after every step, starting
      uniform and annealed over N meta-iterations towards the last step (the paper's schedule:
      earlier steps decay to 0.03/steps each, the last grows to take the rest);
    - ``lslr=True``: a learned inner learning rate per parameter tensor and per step, initialised
      to ``inner_lr`` (test-time steps beyond ``inner_steps`` reuse the last step's rates);
    - ``first_order_until=N``: derivative-order annealing, first order for the first N
      meta-iterations and second order after;
    - cosine annealing of the meta learning rate is the Trainer's ``cosine`` option.

    >>> import fastadapt
    >>> maml = fastadapt.MAML(fastadapt.models.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    """

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, multi_step_loss: int = 0,
                 lslr: bool = False, first_order_until: int = 0):
        super().__init__(model, inner_steps=inner_steps, loss=loss, task_chunk=task_chunk, compile=compile)
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr!r}")
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.multi_step_loss, self.first_order_until = int(multi_step_loss), int(first_order_until)
        self.step_lrs: Optional[nn.Parameter] = None
        if lslr:
            tensors = len(list(model.parameters()))
            self.step_lrs = nn.Parameter(torch.full((max(inner_steps, 1), tensors), self.inner_lr))

    def create_graph(self) -> bool:
        return not self.first_order and self.iteration >= self.first_order_until

    def step_loss_weights(self, steps: int) -> Optional[torch.Tensor]:
        if not self.multi_step_loss or steps == 0:
            return None
        progress = min(self.iteration / self.multi_step_loss, 1.0)
        floor = 0.03 / steps
        weights = torch.full((steps,), max((1.0 - progress) / steps, floor))
        weights[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
        return weights.to(next(self.model.parameters()))

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield fast
        for step in range(steps):
            grads = self.support_grad(fast, buffers, support_x, support_y, create_graph)
            if self.step_lrs is None:
                fast = {name: w - self.inner_lr * grads[name] for name, w in fast.items()}
            else:
                rates = self.step_lrs[min(step, self.step_lrs.shape[0] - 1)]
                fast = {name: w - rates[j] * grads[name] for j, (name, w) in enumerate(fast.items())}
            yield fast
