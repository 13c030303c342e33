"""ANIL (Raghu, Raghu, Bengio and Vinyals, 2019): adapt only the head in the inner loop."""

from __future__ import annotations

from .functional import detach, grad_of
from .maml import MAML


class ANIL(MAML):
    """MAML whose inner loop adapts only the parameters under ``head`` (a submodule name; the
    rest is the body). The body is meta-learned but frozen within a task, so its features of the
    support set are computed once per task, not once per step. The model must be
    ``head(body(x))`` with the body in a submodule named ``body`` (``conv4`` and ``mlp`` call
    them ``features`` and ``head``)."""

    name = "anil"
    summary = "ANIL (Raghu et al. 2019): only the head adapts"

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, head: str = "head",
                 body: str = "features", classification=None):
        super().__init__(model, inner_lr, inner_steps, first_order=first_order, loss=loss, task_chunk=task_chunk,
                         compile=compile, classification=classification)
        for part in (head, body):
            if not hasattr(model, part):
                raise ValueError(f"ANIL: the model has no submodule {part!r} (pass head=/body= names)")
        self.head_name, self.body_name = head, body

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        yield params
        body = params if create_graph else detach(params)
        features = self.forward_with(body, buffers, support_x, part=self.body_name)
        prefix = self.head_name + "."
        head = {n: w for n, w in params.items() if n.startswith(prefix)}

        def head_loss(h):
            return self.loss_fn(self.forward_with(h, buffers, features, part=self.head_name), support_y)

        for _ in range(steps):
            grads = grad_of(head_loss, head, create_graph)
            head = {n: w - self.inner_lr * grads[n] for n, w in head.items()}
            yield {**params, **head}
