"""Meta-SGD (Li, Zhou, Chen and Li, 2017): MAML with a learned inner learning rate per weight."""

from __future__ import annotations

import torch
from torch import nn

from .maml import MAML


class MetaSGD(MAML):
    """Each weight element has its own inner learning rate, initialised to ``inner_lr`` and
    meta-learned with the initialisation (``self.inner_lrs`` is part of ``.parameters()``; its
    rates are in the model's parameter order, so ``zip(model.parameters(), inner_lrs.values())``
    pairs each weight with its rates)."""

    name = "metasgd"
    summary = "Meta-SGD (Li et al. 2017): a learned inner rate per weight"

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, classification=None):
        super().__init__(model, inner_lr, inner_steps, first_order=first_order, loss=loss, task_chunk=task_chunk,
                         compile=compile, classification=classification)
        # built from pairs, not a dict: ParameterDict sorts a plain dict's keys, which would list the
        # rates in name order (0, 11, 12, ..., 2) rather than in the model's parameter order
        self.inner_lrs = nn.ParameterDict([
            (self._key(name), nn.Parameter(torch.full_like(p, self.inner_lr))) for name, p in model.named_parameters()
        ])

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield fast
        for _ in range(steps):
            grads = self.support_grad(fast, buffers, support_x, support_y, create_graph)
            fast = {name: w - self.inner_lrs[self._key(name)] * grads[name] for name, w in fast.items()}
            yield fast
