"""Prototypical Networks (Snell, Swersky and Zemel, 2017)."""

from __future__ import annotations

import torch.nn.functional as F

from .engine import MetaLearner


class ProtoNet(MetaLearner):
    """Classify by negative squared Euclidean distance to the class means (prototypes) of the
    embedded support set. The model is the embedding; ``embedding="features"`` uses that submodule
    of a network with a head (``conv4``), ``None`` the whole model.

    Adaptation is computing prototypes, so ``adapt`` returns the weights plus a ``"prototypes"``
    entry, ``task_output`` scores inputs against them, and ``fine_tune``'s per-step results are
    the same at every step. Trained episodically with the query cross-entropy, through the engine.
    Prototypes take any number of classes: ``use_classes(n)`` sets ``n_way``.
    """

    name = "protonet"
    summary = "Prototypical Networks (Snell et al. 2017)"
    classifies_only = True
    ignores = {"inner_lr": "it takes no inner gradient steps", "first_order": "it takes no inner gradient steps",
               "inner_steps": "its adaptation is the prototypes", "inner_steps_test": "its adaptation is the prototypes"}

    @classmethod
    def from_config(cls, model, config):
        if config.loss != "cross_entropy":
            raise ValueError("ProtoNet classifies; it cannot learn the sinusoid regression tasks")
        return cls(model, config.data.n_way, embedding="features" if hasattr(model, "features") else None,
                   task_chunk=config.algorithm.task_chunk, compile=config.algorithm.compile)

    def __init__(self, model, n_way: int, embedding="features", task_chunk="auto", compile: bool = False):
        super().__init__(model, inner_steps=0, loss="cross_entropy", task_chunk=task_chunk, compile=compile)
        if embedding is not None and not hasattr(model, embedding):
            raise ValueError(f"ProtoNet: the model has no submodule {embedding!r} (pass embedding=None)")
        self.n_way, self.embedding = int(n_way), embedding

    @property
    def takes_steps(self) -> bool:
        return False

    def create_graph(self) -> bool:
        """No inner gradient steps, so nothing is second order; the meta-gradient reaches the
        embedding through the prototypes as through any forward pass."""
        return False

    def output_classes(self):
        return None

    def use_classes(self, n_way: int) -> None:
        self.n_way = int(n_way)

    def embed(self, params, buffers, x):
        return self.forward_with(params, buffers, x, part=self.embedding)

    def task_output(self, fast, buffers, x):
        prototypes = fast["prototypes"]
        z = self.embed(fast, buffers, x)
        return -((z[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        z = self.embed(params, buffers, support_x)
        onehot = F.one_hot(support_y, self.n_way).to(z.dtype)
        prototypes = (onehot.T @ z) / onehot.sum(0)[:, None]
        fast = {**params, "prototypes": prototypes}
        for _ in range(steps + 1):
            yield fast
