"""MAML (Finn, Abbeel and Levine, ICML 2017) and first-order MAML."""

from __future__ import annotations

from .engine import MetaLearner

# MAML's keyword arguments for MAML++ options, from before MAML++ had its own class.
_PLUS_PLUS_KEYWORDS = ("multi_step_loss", "lslr", "first_order_until", "per_step_bn", "bn_statistics", "bn_momentum")


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning.

    Each task takes ``inner_steps`` SGD steps of size ``inner_lr`` on its support set, starting from
    the meta-parameters; the meta-loss is the query loss of the adapted weights. With
    ``first_order=False`` (default) the meta-gradient differentiates through the inner steps
    (second order); ``first_order=True`` treats the inner gradients as constants (FOMAML).

    ``MAML(..., lslr=True)`` and the other MAML++ keywords build a ``MAMLPlusPlus`` with just those
    options on (how MAML++ was written before it had its own class).

    >>> import fastadapt
    >>> maml = fastadapt.MAML(fastadapt.models.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    """

    name = "maml"
    summary = "second-order MAML (Finn et al. 2017)"

    def __new__(cls, *args, **kwargs):
        if cls is MAML and any(key in kwargs for key in _PLUS_PLUS_KEYWORDS):
            from .mamlpp import MAMLPlusPlus
            return super().__new__(MAMLPlusPlus)
        return super().__new__(cls)

    @classmethod
    def accepted_options(cls):
        """``maml`` and ``fomaml`` take MAML++'s options (``--algo maml --lslr``); subclasses their own."""
        if cls in (MAML, FirstOrderMAML):
            from .mamlpp import MAMLPlusPlus
            return MAMLPlusPlus.options
        return cls.options

    @classmethod
    def from_config(cls, model, config):
        a = config.algorithm
        if cls in (MAML, FirstOrderMAML) and any(a.options.get(key) for key in _PLUS_PLUS_KEYWORDS):
            from .mamlpp import MAMLPlusPlus  # --algo maml --lslr: MAML with just the chosen MAML++ options
            return MAMLPlusPlus.from_config(model, config, everything=False, first_order=cls is FirstOrderMAML)
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
