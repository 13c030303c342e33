"""The baseline every few-shot result is read beside: a network trained by ordinary
classification over all training classes, then a simple classifier on its features.

The heads, chosen with ``head`` (in training, and in ``eval``/``predict`` of the same run):

- ``centroid``: nearest class mean of centred, L2-normalised features (SimpleShot's CL2N, Wang
  et al. 2019); the centre is the mean feature of the training images.
- ``logistic``: multinomial logistic regression fitted on each task's support features (the
  same features), as Tian et al. (ECCV 2020) do with scikit-learn's defaults (C = 1, intercept
  not penalised); here Nesterov-accelerated gradient descent, vectorised over tasks.
- ``cosine``: cosine similarity to the class means, times a fixed scale (the classifier form of
  Baseline++, Chen et al. ICLR 2019, with its weights at the class means as Meta-Baseline's
  Classifier-Baseline evaluates, Chen et al. ICCV 2021; not fitted).
- ``finetune``: the cosine head as a start, then ``inner_steps_test`` SGD steps of ``inner_lr``
  on the support set: of the head, or with ``finetune_body`` of the whole network (Baseline,
  Chen et al. 2019); evaluation reports each step.

BatchNorm normalises with the running statistics tracked in training, so one image is classified
alone exactly as in a batch. Every head is an ``inner_loop`` over the engine's vmap, so
evaluation runs the same episodes as every other learner.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Option
from . import forward
from .engine import MetaLearner, MetaOutput

HEADS = ("centroid", "logistic", "cosine", "finetune")


class Pretrain(MetaLearner):
    """``model`` needs ``features`` (images -> ``[N, D]``) and ``head`` (a linear layer over every
    training class), as ``conv4(channels, num_training_classes)`` and ``resnet12`` have."""

    name = "pretrain"
    summary = ("ordinary classification over all training classes, then a simple head on the features "
               "(--head centroid|logistic|cosine|finetune: SimpleShot, Tian et al., Baseline++, Baseline)")
    classifies_only = True
    options = (
        Option("head", str, "pretrain: the few-shot classifier on its features", default="centroid", choices=HEADS),
        Option("batch_size", int, "pretrain: images per training mini-batch", default=128, positive=True),
        Option("finetune_body", bool, "pretrain --head finetune: fine-tune the whole network, not only the head"),
        Option("logistic_c", float, "pretrain --head logistic: inverse regularisation strength C", default=1.0,
               positive=True),
    )
    ignores = {"first_order": "its training has no inner loop", "inner_steps": "its training has no inner loop",
               "task_batch": "it trains on mini-batches of images (--batch-size)",
               "k_query": "it trains on mini-batches of images (--batch-size)",
               "group_by": "it trains on mini-batches of images, not tasks",
               "drawers": "it trains on mini-batches of images, not tasks"}
    # the scale of the centroid and cosine heads' logits (Meta-Baseline learns one; about 10)
    SCALE = 10.0
    LOGISTIC_ITERATIONS = 300  # the logits then agree with L-BFGS to about 1e-6 (tests)

    @classmethod
    def class_batch_size(cls, config) -> Optional[int]:
        return int(config.algorithm.options.get("batch_size") or 128)

    @classmethod
    def from_config(cls, model, config):
        if config.loss != "cross_entropy":
            raise ValueError("pretrain classifies; it cannot learn the sinusoid regression tasks")
        o, a = config.algorithm.options, config.algorithm
        return cls(model, head=o.get("head") or "centroid", inner_lr=a.inner_lr,
                   finetune_body=bool(o.get("finetune_body")), logistic_c=o.get("logistic_c") or 1.0,
                   task_chunk=a.task_chunk, compile=a.compile)

    def __init__(self, model, head: str = "centroid", inner_lr: float = 0.1, finetune_body: bool = False,
                 logistic_c: float = 1.0, task_chunk="auto", compile: bool = False):
        super().__init__(model, inner_steps=0, loss="cross_entropy", task_chunk=task_chunk, compile=compile)
        if any(hasattr(m, "normalise") for m in model.modules()):
            raise ValueError("pretrain trains BatchNorm's running statistics and tests with them; TaskNorm (--norm "
                             "tasknorm) keeps none")
        for part in ("features", "head"):
            if not hasattr(model, part):
                raise ValueError(f"pretrain: the model has no submodule {part!r} (conv4 and resnet12 have "
                                 "'features' and 'head')")
        self.inner_lr, self.finetune_body, self.logistic_c = float(inner_lr), bool(finetune_body), float(logistic_c)
        self.head, self.n_way = head, 5
        features = model.head.in_features
        # the mean training feature, tracked as BatchNorm tracks its statistics: the centre of CL2N
        self.register_buffer("feature_mean", torch.zeros(features))

    @property
    def head(self) -> str:
        return self._head

    @head.setter
    def head(self, value: str) -> None:
        if value not in HEADS:
            raise ValueError(f"pretrain: head must be one of {', '.join(HEADS)}, got {value!r}")
        self._head = value
        self._compiled = {}

    @property
    def takes_steps(self) -> bool:
        return self.head == "finetune"

    def forward_policy(self) -> forward.ForwardPolicy:
        return forward.ForwardPolicy(statistics="running")

    def create_graph(self) -> bool:
        return False

    def output_classes(self):
        return None

    def use_classes(self, n_way: int) -> None:
        """Any number of classes: every head is built from the support set."""
        self.n_way = int(n_way)

    # ------------------------------------------------------------------ training: plain classification
    def train_step(self, batch, optimizer, *, per_step: bool = False, clip_grad=None, before_update=None) -> MetaOutput:
        """One mini-batch of ordinary classification (a ``ClassBatch``): cross-entropy of the
        network's head over every training class, BatchNorm's running statistics updated."""
        if not hasattr(batch, "labels"):
            raise TypeError("pretrain trains on ClassBatch mini-batches (ClassBatchSampler), not on episodes")
        optimizer.zero_grad(set_to_none=True)
        with self.classification_context():
            features = self.model.features(batch.images)
            logits = self.model.head(features)
        loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
        with torch.no_grad():
            self.feature_mean.lerp_(features.detach().mean(0), 0.1)
        accuracy = (logits.detach().argmax(1) == batch.labels).to(logits.dtype).mean()
        out = MetaOutput(loss=loss.detach(), query_loss=loss.detach()[None], query_accuracy=accuracy[None],
                         task_loss=loss.detach()[None, None], task_accuracy=accuracy[None, None])
        return self.apply_update(out, optimizer, clip_grad, before_update)

    # ------------------------------------------------------------------ testing: a head per task
    def embed(self, params, buffers, x):
        """Centred, L2-normalised features (CL2N)."""
        z = self.forward_with(params, buffers, x, part="features")
        return F.normalize(z - self.feature_mean, dim=-1)

    def task_output(self, fast, buffers, x):
        return self.embed(fast, buffers, x) @ fast["classifier_weight"].T + fast["classifier_bias"]

    def class_means(self, z, support_y):
        """The mean feature of each of the task's ``n_way`` classes, and the one-hot targets."""
        onehot = F.one_hot(support_y, self.n_way).to(z.dtype)
        return (onehot.T @ z) / onehot.sum(0).clamp_min(1)[:, None], onehot

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        z = self.embed(params, buffers, support_x)
        means, onehot = self.class_means(z, support_y)
        if self.head == "centroid":  # -|z - c|^2 = 2 z.c - |c|^2 - 1 for unit z
            weight, bias = 2 * self.SCALE * means, -self.SCALE * (means ** 2).sum(-1)
        elif self.head == "logistic":
            weight, bias = self.fit_logistic(z, onehot)
        else:
            weight, bias = self.SCALE * F.normalize(means, dim=-1), torch.zeros_like(means[:, 0])
        fast = {**params, "classifier_weight": weight, "classifier_bias": bias}
        yield fast
        if self.head != "finetune":
            for _ in range(steps):
                yield fast
            return
        trained = [n for n in fast if n.startswith("classifier_") or (self.finetune_body and n.startswith("features."))]
        for _ in range(steps):
            def loss(chosen):
                return F.cross_entropy(self.task_output({**fast, **chosen}, buffers, support_x), support_y)
            chosen = {n: fast[n].detach() for n in trained}
            grads = torch.func.grad(loss)(chosen)
            fast = {**fast, **{n: chosen[n] - self.inner_lr * grads[n] for n in trained}}
            yield fast

    def fit_logistic(self, z, onehot):
        """Multinomial logistic regression on features ``z`` ``[S, D]`` with one-hot targets:
        minimise mean cross-entropy + |W|^2 / (2 C S) (scikit-learn's objective divided by C S; the
        intercept not penalised) by Nesterov's accelerated gradient, a fixed number of iterations
        with step 1 / L, where L bounds the curvature (unit features: 1 + 1 / (C S))."""
        samples = z.shape[0]
        penalty = 1.0 / (self.logistic_c * samples)
        step = 1.0 / (1.0 + penalty)
        x = torch.cat([z, torch.ones_like(z[:, :1])], 1)  # the intercept as a last feature
        theta = torch.zeros(onehot.shape[1], x.shape[1], dtype=z.dtype, device=z.device)
        mask = torch.ones_like(theta)
        mask[:, -1] = 0
        previous = theta
        for iteration in range(self.LOGISTIC_ITERATIONS):
            look = theta + (iteration / (iteration + 3)) * (theta - previous)
            probabilities = torch.softmax(x @ look.T, dim=1)
            gradient = (probabilities - onehot).T @ x / samples + penalty * mask * look
            previous, theta = theta, look - step * gradient
        return theta[:, :-1], theta[:, -1]

    def fine_tune(self, batch, inner_steps=None, *, steps=None) -> MetaOutput:
        self.use_classes(int(batch.support_y.max()) + 1)
        return super().fine_tune(batch, self._steps(inner_steps, steps) if self.takes_steps else 0)

    def adapt_tasks(self, batch, inner_steps=None, per_step: bool = False):
        self.use_classes(int(batch.support_y.max()) + 1)
        return super().adapt_tasks(batch, inner_steps if self.takes_steps else 0, per_step=per_step)

    def adapt(self, support_x, support_y, inner_steps=None, *, steps=None):
        self.use_classes(int(support_y.max()) + 1)
        steps = self._steps(inner_steps, steps)
        return super().adapt(support_x, support_y, steps if self.takes_steps else 0)
