"""Evaluation on fixed episodes: per-inner-step accuracy with 95% confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed


def confidence_interval(values: torch.Tensor) -> torch.Tensor:
    """Half-width of the normal 95% interval of the mean over axis 0: 1.96 * std / sqrt(n),
    with the sample standard deviation (n - 1 in the denominator)."""
    n = values.shape[0]
    if n < 2:
        return torch.zeros_like(values[0], dtype=torch.float64)
    return 1.96 * values.double().std(dim=0, unbiased=True) / math.sqrt(n)


@dataclass
class EvalResult:
    """Per-inner-step means and 95% interval half-widths over ``tasks`` tasks."""

    accuracy: Optional[torch.Tensor]
    accuracy_ci: Optional[torch.Tensor]
    loss: torch.Tensor
    loss_ci: torch.Tensor
    tasks: int
    returns: Optional[torch.Tensor] = None      # meta-RL: mean return per step, before adapting first
    returns_ci: Optional[torch.Tensor] = None
    per_step: bool = True  # False: a learner without inner steps, scored once (one row)

    def table(self) -> str:
        if not self.per_step:
            lines = [f"{self.tasks} test tasks, mean and 95% confidence interval:"]
            if self.accuracy is not None:
                lines.append(f"accuracy {100 * self.accuracy[-1]:.2f}% ± {100 * self.accuracy_ci[-1]:.2f}, "
                             f"loss {self.loss[-1]:.4f} ± {self.loss_ci[-1]:.4f}")
            else:
                lines.append(f"query loss {self.loss[-1]:.4f} ± {self.loss_ci[-1]:.4f}")
            return "\n".join(lines)
        lines = [f"{self.tasks} test tasks, mean and 95% confidence interval per inner step:"]
        if self.returns is not None:
            lines.append(f"{'step':>4s} {'return':>20s}")
            for s in range(len(self.returns)):
                lines.append(f"{s:4d} {self.returns[s]:11.2f} ± {self.returns_ci[s]:6.2f}"
                             + ("   (before adapting)" if s == 0 else ""))
        elif self.accuracy is not None:
            lines.append(f"{'step':>4s} {'accuracy':>18s} {'loss':>18s}")
            for s in range(len(self.loss)):
                lines.append(f"{s:4d} {100 * self.accuracy[s]:9.2f}% ± {100 * self.accuracy_ci[s]:5.2f} "
                             f"{self.loss[s]:9.4f} ± {self.loss_ci[s]:6.4f}")
        else:
            lines.append(f"{'step':>4s} {'query loss':>20s}")
            for s in range(len(self.loss)):
                lines.append(f"{s:4d} {self.loss[s]:11.4f} ± {self.loss_ci[s]:6.4f}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {"tasks": self.tasks, "loss": self.loss.tolist(), "loss_ci": self.loss_ci.tolist()}
        if self.accuracy is not None:
            out.update(accuracy=self.accuracy.tolist(), accuracy_ci=self.accuracy_ci.tolist())
        if self.returns is not None:
            out.update(returns=self.returns.tolist(), returns_ci=self.returns_ci.tolist())
        return out


def _views(x: torch.Tensor, views: int, augment: Callable, seed) -> torch.Tensor:
    """``[T, N, ...]`` images as ``[T, N, views, ...]``: each image, then ``views - 1`` augmented
    copies drawn from a generator seeded by ``seed`` and the view's number."""
    flat = x.flatten(0, 1)
    copies = [x] + [augment(flat, np.random.default_rng([*seed, v])).view_as(x) for v in range(1, views)]
    return torch.stack(copies, 2)


PREDICT_IMAGES = 4096  # query images per predict call of view_probabilities (each task's rows stay together)


def view_probabilities(learner, batch, inner_steps: int, views: int, augment: Optional[Callable], seed=(0,)):
    """``[T, Q, n_way]`` class probabilities of every query, with test-time augmentation: every
    support image and its ``views - 1`` augmented copies are the support set (more shots of each
    class), and each query's probabilities are the mean over its ``views`` copies. The copies are
    drawn from ``seed`` (the same on every call); with one view nothing is drawn and these are the
    probabilities of plain evaluation after ``inner_steps``. Under batch statistics the views of a
    task's queries are normalised together, as the queries are without augmentation."""
    tasks, queries = batch.query_y.shape
    support = _views(batch.support_x, views, augment, (*seed, 0)).flatten(1, 2)
    query = _views(batch.query_x, views, augment, (*seed, 1)).flatten(1, 2)
    enlarged = type(batch)(support, batch.support_y.repeat_interleave(views, 1), batch.query_x, batch.query_y)
    _, fast = learner.adapt_tasks(enlarged, inner_steps)
    chunk = max(1, PREDICT_IMAGES // query.shape[1])  # many views: a few tasks at a time (memory)
    with torch.no_grad():
        probabilities = torch.cat([learner.predict({name: w[start:start + chunk] for name, w in fast.items()},
                                                   query[start:start + chunk]).softmax(-1)
                                   for start in range(0, tasks, chunk)])
    return probabilities.view(tasks, queries, views, -1).mean(2)


def score_probabilities(probabilities: torch.Tensor, query_y: torch.Tensor):
    """``(task_loss, task_accuracy)``, each ``[T]``: the negative log-likelihood and accuracy of
    ``[T, Q, n_way]`` class probabilities against the ``[T, Q]`` labels."""
    tasks, queries = query_y.shape
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log().flatten(0, 1), query_y.flatten(),
                      reduction="none").view(tasks, queries).mean(1)
    return loss, (probabilities.argmax(-1) == query_y).to(loss.dtype).mean(1)


def score_with_views(learner, batch, inner_steps: int, views: int, augment: Callable, seed=(0,)):
    """``(task_loss, task_accuracy)``, each ``[T]``, of ``view_probabilities``."""
    return score_probabilities(view_probabilities(learner, batch, inner_steps, views, augment, seed), batch.query_y)


@dataclass
class Member:
    """One more model of an ensemble scored by ``evaluate``: its learner, the inner steps it takes
    at test and its view augmentation (used when ``views`` > 1)."""

    learner: object
    inner_steps: int
    view_augment: Optional[Callable] = None


def _ensemble_scores(members: List[Member], batch, device, views: int, seed):
    """Each member's query probabilities (``view_probabilities``, the same views' seed for all),
    averaged over the members with equal weight, then scored."""
    total = None
    for member in members:
        dtype = next(member.learner.parameters()).dtype
        steps = member.inner_steps if getattr(member.learner, "takes_steps", True) else 0
        probabilities = view_probabilities(member.learner, batch.to(device, dtype), steps, views,
                                           member.view_augment, seed).double()
        total = probabilities if total is None else total + probabilities
    return score_probabilities(total / len(members), batch.query_y.to(total.device))


def evaluate(learner, episodes: List, inner_steps: Optional[int] = None, device=None, progress: bool = False,
             desc: str = "evaluate", should_stop: Optional[Callable[[], bool]] = None, views: int = 1,
             view_augment: Optional[Callable] = None, ensemble: Sequence[Member] = ()) -> Optional[EvalResult]:
    """Adapt every task of ``episodes`` (a list of ``TaskBatch``, e.g. ``sampler.fixed(n)``) for
    ``inner_steps`` steps, vectorised per batch, and summarise per-step query accuracy and loss
    (and, for a meta-RL learner, whose ``fine_tune`` gives ``task_return``, the returns).
    The meta-parameters and buffers are left untouched. Under torch.distributed the batches are
    split over the ranks and the per-task results gathered, each task counted once.

    ``views`` > 1: test-time augmentation with ``view_augment(images, generator)``
    (``view_probabilities``); classification only, scored after the last step (one row).
    ``ensemble``: more models (``Member``, e.g. other runs or seeds) whose class probabilities are
    averaged with ``learner``'s, each query predicted by the mean (classification only, one row).
    ``progress`` shows a tqdm bar over the batches; ``should_stop``, checked between batches,
    ends the evaluation early, and then None is returned."""
    if not (isinstance(views, int) and views >= 1):
        raise ValueError(f"evaluate: views must be a positive integer, got {views!r}")
    if views > 1 and (view_augment is None or not getattr(learner, "classification", False)):
        raise ValueError("evaluate: test-time augmentation (views > 1) needs view_augment and a classifier")
    takes_steps = getattr(learner, "takes_steps", True)
    inner_steps = inner_steps if takes_steps else 0
    members = []
    if ensemble:
        members = [Member(learner, learner.inner_steps if inner_steps is None else inner_steps, view_augment),
                   *ensemble]
        for number, member in enumerate(members):
            if not isinstance(member, Member):
                raise TypeError(f"evaluate: ensemble members must be evaluate.Member, got {type(member).__name__}")
            if not getattr(member.learner, "classification", False):
                raise ValueError(f"evaluate: ensemble member {number} is not a classifier; only class "
                                 "probabilities can be averaged")
            if views > 1 and member.view_augment is None:
                raise ValueError(f"evaluate: ensemble member {number} has no view_augment for views > 1")
    ctx = distributed.current()
    per_step = takes_steps and views == 1 and not members
    dtype = next(learner.parameters()).dtype
    local = []
    mine = distributed.shard(list(enumerate(episodes)), ctx)
    for index, batch in tqdm(mine, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if should_stop is not None and should_stop():
            return None
        if members:
            loss, accuracy = _ensemble_scores(members, batch, device, views, seed=(index,))
            local.append((index, loss.double().cpu()[:, None], accuracy.double().cpu()[:, None], None))
            continue
        if views > 1:
            steps = learner.inner_steps if inner_steps is None else inner_steps
            loss, accuracy = score_with_views(learner, batch.to(device, dtype), steps, views, view_augment,
                                              seed=(index,))
            local.append((index, loss.double().cpu()[:, None], accuracy.double().cpu()[:, None], None))
            continue
        out = learner.fine_tune(batch.to(device, dtype), inner_steps=inner_steps)
        accuracy = None if out.task_accuracy is None else out.task_accuracy.double().cpu()
        task_return = getattr(out, "task_return", None)
        local.append((index, out.task_loss.double().cpu(), accuracy,
                      None if task_return is None else task_return.double().cpu()))
    results = sorted(distributed.gather(local, ctx), key=lambda r: r[0])
    losses = [r[1] for r in results]
    accuracies = [r[2] for r in results if r[2] is not None]
    returns = [r[3] for r in results if r[3] is not None]
    if not losses:
        raise ValueError("evaluate: no episodes given")
    loss = torch.cat(losses)
    accuracy = torch.cat(accuracies) if accuracies else None
    task_returns = torch.cat(returns) if returns else None
    return EvalResult(accuracy=None if accuracy is None else accuracy.mean(0),
                      accuracy_ci=None if accuracy is None else confidence_interval(accuracy),
                      loss=loss.mean(0), loss_ci=confidence_interval(loss), tasks=loss.shape[0],
                      returns=None if task_returns is None else task_returns.mean(0),
                      returns_ci=None if task_returns is None else confidence_interval(task_returns),
                      per_step=per_step)
