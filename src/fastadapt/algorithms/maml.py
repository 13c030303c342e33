"""MAML (Finn, Abbeel and Levine, ICML 2017) and first-order MAML."""

from __future__ import annotations

import inspect
import warnings

from . import registry
from .engine import MetaLearner


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning.

    Each task takes ``inner_steps`` SGD steps of size ``inner_lr`` on its support set, starting from
    the meta-parameters; the meta-loss is the query loss of the adapted weights. With
    ``first_order=False`` (default) the meta-gradient differentiates through the inner steps
    (second order); ``first_order=True`` treats the inner gradients as constants (FOMAML).

    >>> import fastadapt
    >>> maml = fastadapt.MAML(fastadapt.models.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    """

    name = "maml"
    summary = "second-order MAML (Finn et al. 2017)"

    def __new__(cls, *args, **kwargs):
        """``MAML(..., lslr=True)`` (keywords of an algorithm that extends MAML, from before MAML++
        had its own class) still builds that algorithm, with a ``DeprecationWarning``."""
        own = inspect.signature(cls.__init__).parameters
        extra = [key for key in kwargs if key not in own]
        if cls is MAML and extra:
            for extension in registry.extensions_of(cls.name):
                if all(key in inspect.signature(extension.__init__).parameters for key in extra):
                    warnings.warn(f"MAML({', '.join(key + '=' for key in extra)}...) is deprecated: use "
                                  f"fastadapt.{extension.__name__}(...), which these options belong to",
                                  DeprecationWarning, stacklevel=2)
                    return super().__new__(extension)
        return super().__new__(cls)

    @classmethod
    def from_config(cls, model, config):
        a = config.algorithm
        return cls(model, a.inner_lr, a.inner_steps, first_order=a.first_order, loss=config.loss,
                   task_chunk=a.task_chunk, compile=a.compile)

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, classification=None):
        super().__init__(model, inner_steps=inner_steps, loss=loss, task_chunk=task_chunk, compile=compile,
                         classification=classification)
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


class FirstOrderMAML(MAML):
    """MAML with ``first_order=True``: the inner gradients are constants in the meta-gradient."""

    name = "fomaml"
    summary = "first-order MAML"

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = True,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, classification=None):
        super().__init__(model, inner_lr, inner_steps, first_order=True, loss=loss, task_chunk=task_chunk,
                         compile=compile, classification=classification)
