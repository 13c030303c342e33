"""MAML (Finn, Abbeel and Levine, ICML 2017) and its first-order approximation."""

from __future__ import annotations

from .base import MetaLearner


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning.

    Each task takes ``inner_steps`` SGD steps of size ``inner_lr`` on its support set, starting from
    the meta-parameters; the meta-loss is the query loss of the adapted weights. With
    ``first_order=False`` (default) the meta-gradient differentiates through the inner steps
    (second order); ``first_order=True`` treats the inner gradients as constants (FOMAML).

    >>> import fastadapt
    >>> maml = fastadapt.MAML(fastadapt.models.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    """

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False):
        super().__init__(model, inner_steps=inner_steps, loss=loss, task_chunk=task_chunk, compile=compile)
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr!r}")
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)

    def create_graph(self) -> bool:
        return not self.first_order

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield fast
        for _ in range(steps):
            grads = self.support_grad(fast, buffers, support_x, support_y, create_graph)
            fast = {name: w - self.inner_lr * grads[name] for name, w in fast.items()}
            yield fast
