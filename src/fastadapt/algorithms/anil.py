"""ANIL (Raghu, Raghu, Bengio and Vinyals, 2019): adapt only the head in the inner loop."""

from __future__ import annotations

import torch
from torch.func import functional_call

from .base import _exact_batch_norm, detach
from .maml import MAML


class ANIL(MAML):
    """MAML whose inner loop adapts only the parameters under ``head`` (a submodule name; the
    rest is the body). The body is meta-learned but frozen within a task, so its features of the
    support set are computed once per task, not once per step. The model must be
    ``head(body(x))`` with the body in a submodule named ``body`` (``conv4`` and ``mlp`` call
    them ``features`` and ``head``)."""

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, head: str = "head",
                 body: str = "features"):
        super().__init__(model, inner_lr, inner_steps, first_order, loss, task_chunk, compile)
        for part in (head, body):
            if not hasattr(model, part):
                raise ValueError(f"ANIL: the model has no submodule {part!r} (pass head=/body= names)")
        self.head_name, self.body_name = head, body

    def _part(self, params, part):
        prefix = part + "."
        return {n[len(prefix):]: w for n, w in params.items() if n.startswith(prefix)}

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        yield params
        head_module, body_module = getattr(self.model, self.head_name), getattr(self.model, self.body_name)
        body_params = self._part(params, self.body_name)
        body_buffers = self._part(buffers, self.body_name)
        if create_graph:
            with _exact_batch_norm():
                features = functional_call(body_module, (body_params, body_buffers), (support_x,))
        else:
            features = functional_call(body_module, (detach(body_params), body_buffers), (support_x,))
        head = self._part(params, self.head_name)

        def head_loss(h):
            return self.loss_fn(functional_call(head_module, h, (features,)), support_y)

        for _ in range(steps):
            grads = torch.func.grad(head_loss)(head if create_graph else detach(head))
            head = {n: w - self.inner_lr * grads[n] for n, w in head.items()}
            yield {**params, **{f"{self.head_name}.{n}": w for n, w in head.items()}}
