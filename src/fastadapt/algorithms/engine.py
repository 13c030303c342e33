"""The shared engine of every gradient-based meta-learner.

An algorithm describes ONE task: ``inner_loop`` yields its fast weights after each inner step,
written as a pure function of (params, buffers, support set) with ``functional.py``'s pieces.
``MetaLearner`` maps that over the task axis with ``torch.func.vmap``, runs tasks in chunks to
bound memory and keep the working set in cache, scores the query set, and reduces over tasks. It
never deep-copies or clones the model. Every forward pass runs under the learner's
``ForwardPolicy`` (``forward.py``: BatchNorm's statistics, small convolutions), entered here only.

The hooks an algorithm may override, each with a default:

- ``inner_loop`` (required): one task's adaptation;
- ``task_output``: an adapted task's output on inputs (ProtoNet: distances to prototypes);
- ``before_meta_batch``: called with each training meta-batch before its meta-gradient
  (MAML++ records its per-step BatchNorm statistics there);
- ``train_step``: one meta-iteration, gradient and update (default: ``meta_backward``, the
  caller's ``before_update``, clipping, ``optimizer.step()``; Reptile steps towards the adapted
  weights instead);
- ``create_graph``, ``step_loss_weights``, ``forward_policy``, ``initial_weights``,
  ``make_optimizer``, ``from_config``.

A subclass that sets ``name`` registers itself (``registry.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..config import Option
from . import forward, registry
from .functional import detach, forward_with, grad_of

Params = Dict[str, torch.Tensor]


@dataclass
class MetaOutput:
    """What a meta-batch produced.

    ``loss``: the scalar meta-loss, differentiable w.r.t. the meta-parameters when produced by
    ``meta_loss``: the mean over tasks of the final query loss, or, under MAML++'s multi-step
    loss, of its weighted sum of the query losses after every step. ``query_loss`` / ``query_accuracy``: final-step means over
    tasks, or 1-D ``[steps + 1]`` per-step means (before adapting, then after each step) when
    per-step scoring was asked for. ``task_loss`` / ``task_accuracy``: the same per task
    (``[T]`` or ``[T, steps + 1]``), for confidence intervals. Accuracies are None for regression.
    """

    loss: torch.Tensor
    query_loss: torch.Tensor
    query_accuracy: Optional[torch.Tensor]
    task_loss: torch.Tensor
    task_accuracy: Optional[torch.Tensor]


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == targets).to(logits.dtype).mean()


_CPU_CHUNK_VALUES = 256 * 1024

# name -> (function, whether it classifies)
_LOSSES = {"cross_entropy": (F.cross_entropy, True), "mse": (F.mse_loss, False)}

registered = registry.registered


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in evaluation mode for the block (DropBlock off), its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class MetaLearner(nn.Module):
    """Base of every algorithm: owns batching over tasks (vmap), chunking and query scoring.

    Subclasses implement ``inner_loop``; a subclass that sets ``name`` (and, if it has settings of
    its own, ``options``, and ``from_config`` when its constructor differs from the default one)
    is registered for the configuration and the command line: adding an algorithm is one file.

    ``loss``: ``"cross_entropy"`` (classification), ``"mse"`` (regression) or a callable, for which
    ``classification`` must say which it is (accuracy is reported only for classification).
    ``task_chunk`` is the number of tasks run together in one vmapped call: ``"auto"`` picks by
    device (on CPU, chunks of about 256k input values, i.e. 4 Omniglot tasks: per-task weights
    turn convolutions into slower grouped ones and a large working set falls out of cache; on GPU,
    all tasks at once), an int fixes it, and ``None`` runs the whole meta-batch at once. Results do
    not depend on it.
    """

    name: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ""
    options: ClassVar[Tuple[Option, ...]] = ()
    extends: ClassVar[Tuple[str, ...]] = ()  # algorithms whose configurations may set this one's options
    ignores: ClassVar[Dict[str, str]] = {}   # shared settings that mean nothing here: flat key -> why

    @classmethod
    def from_base_config(cls, model: nn.Module, config, base: type) -> "MetaLearner":
        """Build for a configuration of the algorithm ``base`` (one of ``extends``) that sets some of
        this class's options."""
        raise NotImplementedError(f"{cls.__name__} declares no algorithm it extends")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        registry.register(cls)

    @classmethod
    def from_config(cls, model: nn.Module, config) -> "MetaLearner":
        """Build from a ``fastadapt.config.RunConfig``: the common settings, and each of ``options``
        by its name as a keyword argument (those left None keep the constructor's default)."""
        a = config.algorithm
        own = {o.name: a.options[o.name] for o in cls.options if a.options.get(o.name) is not None}
        return cls(model, inner_steps=a.inner_steps, loss=config.loss, task_chunk=a.task_chunk, compile=a.compile,
                   **own)

    @classmethod
    def accepted_options(cls) -> Tuple[Option, ...]:
        """The options a configuration may set for this algorithm: its own ``options`` and those of
        the algorithms that extend it (``registry.py``)."""
        return registry.accepted_options(cls)

    def __init__(self, model: nn.Module, inner_steps: int = 5, loss="cross_entropy",
                 task_chunk="auto", compile: bool = False, classification: Optional[bool] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        known = {fn: (name, kind) for name, (fn, kind) in _LOSSES.items()}
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")
            self.loss_name, (self.loss_fn, kind) = loss, _LOSSES[loss]
        elif loss in known:
            self.loss_fn, (self.loss_name, kind) = loss, known[loss]
        elif callable(loss):
            if classification is None:
                raise ValueError("a custom loss needs classification=True (it scores class logits; accuracy is "
                                 "reported) or classification=False (regression)")
            self.loss_name, self.loss_fn, kind = getattr(loss, "__name__", "custom"), loss, classification
        else:
            raise ValueError(f"loss must be a name or a callable, got {loss!r}")
        if not (task_chunk is None or task_chunk == "auto" or (isinstance(task_chunk, int) and task_chunk > 0)):
            raise ValueError(f"task_chunk must be 'auto', None or a positive integer, got {task_chunk!r}")
        self.classification = bool(kind if classification is None else classification)
        self.model = model
        self.inner_steps = inner_steps
        self.task_chunk = task_chunk
        self.use_compile = compile
        self.iteration = 0  # meta-iterations taken so far, for schedules inside the algorithm
        # None: vmap the query pass on GPU, loop over tasks on CPU (see _chunk_fn); tests force both.
        self.vmap_query: Optional[bool] = None
        self._compiled: Dict[tuple, Callable] = {}
        self.query_statistics = "batch"

    QUERY_STATISTICS = ("batch", "support")

    def __getstate__(self):
        """A copy (``copy.deepcopy``, pickle) leaves out the cached vmapped functions: they are
        closures over this learner, and a copy that ran them would run this learner's model."""
        state = dict(super().__getstate__())
        state["_compiled"] = {}
        return state

    @property
    def query_statistics(self) -> str:
        """How BatchNorm normalises the query images when the engine scores them (training,
        validation, ``fine_tune``): ``"batch"``, a task's query set together (the MAML paper's
        transductive protocol), or ``"support"``, each query with the statistics of its task's
        support set under the weights being scored, so no query's output depends on another's and
        a model trained this way classifies one image alone as it was trained to."""
        return self._query_statistics

    @query_statistics.setter
    def query_statistics(self, value: str) -> None:
        if value not in self.QUERY_STATISTICS:
            raise ValueError(f"query_statistics must be one of {', '.join(self.QUERY_STATISTICS)}, got {value!r}")
        self._query_statistics = value
        self._compiled = {}

    # ------------------------------------------------------------------ what an algorithm defines
    def inner_loop(self, params: Params, buffers: Params, support_x, support_y, steps: int,
                   create_graph: bool) -> Iterator[Params]:
        """Yield the fast weights of ONE task: first the starting weights, then after each step."""
        raise NotImplementedError

    @property
    def takes_steps(self) -> bool:
        """Whether adaptation is a number of inner steps (evaluation reports each); False for
        learners whose adaptation has no steps (ProtoNet's prototypes), which evaluation scores
        once."""
        return True

    def create_graph(self) -> bool:
        """Whether the inner loop is differentiated through (second order) in ``meta_loss``."""
        return True

    def step_loss_weights(self, steps: int) -> Optional[torch.Tensor]:
        """Weights of the query losses after steps 1..steps in the meta-loss; None: the last only."""
        return None

    def forward_policy(self) -> forward.ForwardPolicy:
        """How the learner's forward passes run (``forward.py``); by default transductive BatchNorm."""
        return forward.ForwardPolicy()

    def initial_weights(self, params: Params) -> Params:
        """The weights of a forward pass before any inner step (MAML++'s per-step BatchNorm
        substitutes its own entries); by default ``params``."""
        return params

    def task_output(self, fast: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """The output on ``x`` of one task's adapted state ``fast`` (what the query loss, ``predict``
        and accuracy score); by default the model with those weights."""
        return self.forward_with(fast, buffers, x)

    def before_meta_batch(self, batch) -> None:
        """Called by ``meta_loss`` and ``meta_backward`` (so by the default ``train_step``) with
        each meta-batch while training, before its meta-gradient; by default nothing."""

    def train_step(self, batch, optimizer: torch.optim.Optimizer, *, per_step: bool = False,
                   clip_grad: Optional[float] = None,
                   before_update: Optional[Callable[[MetaOutput], None]] = None) -> MetaOutput:
        """One meta-iteration on ``batch``: the gradient and the update of the meta-parameters.

        By default: clear the gradients, ``meta_backward``, then ``before_update(out)`` (the
        Trainer averages the gradients over processes and checks the loss there; raising stops
        the update), then clip the gradient norm to ``clip_grad`` and step ``optimizer`` (the one
        ``make_optimizer`` made). An algorithm whose update is not a gradient step overrides this.
        """
        optimizer.zero_grad(set_to_none=True)
        out = self.meta_backward(batch, per_step=per_step)
        return self.apply_update(out, optimizer, clip_grad, before_update)

    def apply_update(self, out: MetaOutput, optimizer, clip_grad: Optional[float] = None,
                     before_update: Optional[Callable[[MetaOutput], None]] = None) -> MetaOutput:
        """The end of a ``train_step`` once ``.grad`` holds the update's direction:
        ``before_update(out)``, clipping, ``optimizer.step()``; returns ``out``."""
        if before_update is not None:
            before_update(out)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip_grad)
        optimizer.step()
        return out

    def output_classes(self) -> Optional[int]:
        """How many classes an adapted model tells apart, as its network fixes it (its last linear
        layer's outputs), or None when any number works or the network does not say."""
        linear = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        return linear[-1].out_features if linear and self.classification else None

    def use_classes(self, n_way: int) -> None:
        """Prepare for ``n_way``-way tasks; an error when the network has another number of outputs
        (learners that take any number, like ProtoNet, override this to accept it)."""
        fixed = self.output_classes()
        if fixed is not None and fixed != n_way:
            raise ValueError(f"the tasks are {n_way}-way, but this is a {fixed}-way model (its output layer has "
                             f"{fixed} units)")

    # ------------------------------------------------------------------ building blocks for algorithms
    def meta_params(self) -> Params:
        return dict(self.model.named_parameters())

    def model_buffers(self) -> Params:
        return dict(self.model.named_buffers())

    def forward_with(self, params: Params, buffers: Params, x: torch.Tensor, *,
                     part: Optional[str] = None) -> torch.Tensor:
        """The model's output on ``x`` with the given weights (``functional.forward_with``)."""
        return forward_with(self.model, params, buffers, x, part=part)

    def support_grad(self, params: Params, buffers: Params, x, y, create_graph: bool) -> Params:
        """Gradient of the loss on (x, y) w.r.t. ``params`` (``functional.grad_of``): second order
        with ``create_graph``, else with the weights detached so no outer graph is recorded."""
        return grad_of(lambda p: self.loss_fn(self.forward_with(p, buffers, x), y), params, create_graph)

    def forward_context(self):
        """Every forward pass the learner makes runs inside: its ``forward_policy()``."""
        return forward.applied(self.model, self.forward_policy())

    def classification_context(self):
        """Ordinary (non-episodic) training passes run inside: the learner's policy with batch
        statistics that also update BatchNorm's running statistics (``forward.py``)."""
        policy = dataclasses.replace(self.forward_policy(), statistics="batch", update_running=True)
        return forward.applied(self.model, policy)

    @classmethod
    def class_batch_size(cls, config) -> Optional[int]:
        """None: the learner trains on episodes (meta-batches of tasks). A learner trained by
        ordinary classification over every training class returns its mini-batch size, and the
        run's training stream is then ``ClassBatch``es of that many images."""
        return None

    def task_chunks(self, batch, with_graph: Optional[bool] = None) -> list:
        """The parts of ``batch`` that the engine runs together, in order (``task_chunk``), when
        recording a graph (``with_graph``; by default: whether gradients are enabled)."""
        with_graph = torch.is_grad_enabled() if with_graph is None else with_graph
        chunk = self._chunk_size(batch, with_graph=with_graph)
        return list(batch.split(chunk)) if chunk else [batch]

    # ------------------------------------------------------------------ one task, then all tasks
    def _adapt_task(self, params, buffers, support_x, support_y, *, steps: int, per_step: bool,
                    create_graph: bool, multi_step: bool = False):
        """The fast weights to score for one task: after every step if ``per_step``, else the last.
        With ``multi_step`` every step's weights stay differentiable (multi-step loss)."""
        scored = []
        for step, fast in enumerate(self.inner_loop(params, buffers, support_x, support_y, steps, create_graph)):
            if step == steps or (multi_step and step > 0):
                scored.append(fast)
            elif per_step or multi_step:
                scored.append(detach(fast))
        return scored

    def _score(self, fast, buffers, query_x, query_y, support_x):
        """Query loss (differentiable) and accuracy of one task's weights (``query_statistics``
        says whether ``support_x`` supplies BatchNorm's statistics)."""
        if self.query_statistics == "support":
            rows = support_x.shape[0]
            with forward.changed(reference_rows=rows):
                out = self.task_output(fast, buffers, torch.cat([support_x.to(query_x.dtype), query_x]))[rows:]
        else:
            out = self.task_output(fast, buffers, query_x)
        loss = self.loss_fn(out, query_y)
        accuracy = _accuracy(out.detach(), query_y) if self.classification else loss.detach() * 0
        return loss, accuracy

    def _chunk_fn(self, steps: int, per_step: bool, create_graph: bool, vmap_query: bool,
                  multi_step: bool = False) -> Callable:
        """One chunk of tasks -> (final query losses [k], losses [k, n], accuracies [k, n], final fast
        weights with a task axis).

        The support-set inner loop is vmapped over tasks. The query pass is vmapped on GPU, but
        on CPU runs task by task: its 15x larger batches then use dense convolutions, which there
        run about 1.6x faster than the grouped ones that per-task weights become under vmap.
        """
        key = (steps, per_step, create_graph, vmap_query, multi_step)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        adapt = vmap(functools.partial(self._adapt_task, steps=steps, per_step=per_step, create_graph=create_graph,
                                       multi_step=multi_step),
                     in_dims=(None, None, 0, 0), randomness="different")
        score_all = vmap(self._score, in_dims=(0, None, 0, 0, 0), randomness="different")

        def score(fast, buffers, query_x, query_y, support_x):
            if vmap_query:
                return score_all(fast, buffers, query_x, query_y, support_x)
            if query_x.dim() == 5 and query_x.shape[2] > 1:
                # channels-last images: faster convolutions and BatchNorm on CPU (one-channel
                # images go through _convolve_by_matmul, whose output is channels-last already)
                query_x = query_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            results = [self._score({n: w[i] for n, w in fast.items()}, buffers, query_x[i], query_y[i], support_x[i])
                       for i in range(query_x.shape[0])]
            return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

        def chunk(params, buffers, support_x, support_y, query_x, query_y, step_weights=None):
            scored = adapt(params, buffers, support_x, support_y)
            losses, accuracies, weighted = [], [], 0
            graph_from = len(scored) - (steps if multi_step else 1)
            for index, fast in enumerate(scored):
                with torch.set_grad_enabled(torch.is_grad_enabled() and index >= graph_from):
                    loss, accuracy = score(fast, buffers, query_x, query_y, support_x)
                if index >= graph_from:
                    weighted = weighted + (loss if not multi_step else step_weights[index - graph_from] * loss)
                losses.append(loss.detach())
                accuracies.append(accuracy)
            return weighted, torch.stack(losses, 1), torch.stack(accuracies, 1), scored[-1]

        fn = torch.compile(chunk) if self.use_compile else chunk
        self._compiled[key] = fn
        return fn

    def _chunk_size(self, batch, with_graph: bool = True) -> Optional[int]:
        if self.task_chunk != "auto":
            return self.task_chunk
        if batch.support_x.is_cuda:
            return None
        # On CPU, bound the inputs of one chunk to about 256k values: 4 Omniglot tasks of 80
        # images of 28x28 (measured fastest by benchmarks/meta_step.py), a whole sinusoid batch.
        # Without a graph (test-time fine-tuning) only the support sets are vmapped and the
        # working set is smaller: 64k support values, 16 Omniglot 5-way 1-shot tasks (chunks of
        # 10-20 measured 11-14% faster than 4 for 100 tasks x 10 steps).
        if not with_graph:
            return max(1, _CPU_CHUNK_VALUES // 4 // batch.support_x[0].numel())
        per_task = batch.support_x[0].numel() + batch.query_x[0].numel()
        return max(1, _CPU_CHUNK_VALUES // per_task)

    def _run_tasks(self, batch, steps: int, per_step: bool, create_graph: bool,
                   on_chunk: Optional[Callable] = None, step_weights: Optional[torch.Tensor] = None,
                   keep_weights: bool = False):
        """Adapt and score ``batch`` chunk by chunk; ``on_chunk(final_losses, num_tasks)`` is called
        on each chunk (to backpropagate it) and returns the losses to keep. With ``keep_weights``
        also the final fast weights of every task (a leading task axis)."""
        params, buffers = self.meta_params(), self.model_buffers()
        vmap_query = batch.support_x.is_cuda if self.vmap_query is None else self.vmap_query
        multi_step = step_weights is not None and steps > 0
        fn = self._chunk_fn(steps, per_step or multi_step, create_graph, vmap_query, multi_step)
        finals, losses, accuracies, weights = [], [], [], []
        with self.forward_context():
            for part in self.task_chunks(batch):
                final, loss, acc, fast = fn(params, buffers, part.support_x, part.support_y,
                                            part.query_x, part.query_y, step_weights)
                if on_chunk is not None:
                    final = on_chunk(final, batch.num_tasks)
                finals.append(final)
                losses.append(loss)
                accuracies.append(acc)
                if keep_weights:
                    weights.append(detach(fast))
        final = torch.cat(finals).mean()
        task_loss, task_acc = torch.cat(losses), torch.cat(accuracies)
        if not per_step:
            task_loss, task_acc = task_loss[:, -1], task_acc[:, -1]
        task_acc = task_acc if self.classification else None
        out = MetaOutput(loss=final, query_loss=task_loss.mean(0),
                         query_accuracy=None if task_acc is None else task_acc.mean(0),
                         task_loss=task_loss, task_accuracy=task_acc)
        if keep_weights:
            return out, {name: torch.cat([w[name] for w in weights]) for name in weights[0]}
        return out

    # ------------------------------------------------------------------ public API
    def on_step(self, iteration: int) -> None:
        """Told by the Trainer before each meta-iteration (0-based), for annealing schedules."""
        self.iteration = iteration

    def meta_loss(self, batch, per_step: bool = False) -> MetaOutput:
        """Mean query loss after adaptation over the tasks of ``batch``, differentiable.

        The graph of every chunk is kept until ``.loss.backward()``; ``meta_backward`` frees each
        chunk's graph as it goes and so bounds memory by one chunk.
        """
        if self.training and torch.is_grad_enabled():
            self.before_meta_batch(batch)
        return self._run_tasks(batch, self.inner_steps, per_step, self.create_graph(),
                               step_weights=self.step_loss_weights(self.inner_steps))

    def meta_backward(self, batch, per_step: bool = False) -> MetaOutput:
        """Accumulate the meta-gradient of ``meta_loss(batch).loss`` into ``.grad``, chunk by chunk."""
        def backward(final, num_tasks):
            (final.sum() / num_tasks).backward()
            return final.detach()

        if self.training and torch.is_grad_enabled():
            self.before_meta_batch(batch)
        return self._run_tasks(batch, self.inner_steps, per_step, self.create_graph(), backward,
                               step_weights=self.step_loss_weights(self.inner_steps))

    def make_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        """The outer optimiser the Trainer uses: Adam at ``meta_lr`` (as in the MAML paper)."""
        return torch.optim.Adam(self.parameters(), lr=meta_lr)

    def _steps(self, inner_steps: Optional[int], steps: Optional[int]) -> int:
        """``inner_steps``, or its older name ``steps``, or the learner's own count."""
        if steps is not None:
            if inner_steps is not None and inner_steps != steps:
                raise ValueError(f"inner_steps={inner_steps} and steps={steps}: give one (steps is its old name)")
            inner_steps = steps
        return self.inner_steps if inner_steps is None else inner_steps

    def fine_tune(self, batch, inner_steps: Optional[int] = None, *, steps: Optional[int] = None) -> MetaOutput:
        """Adapt every task of ``batch`` for ``inner_steps`` steps (default: the learner's) and score
        the query set after each.

        Runs without recording any graph and leaves the meta-parameters and buffers untouched.
        """
        with torch.no_grad(), evaluating(self.model):
            return self._run_tasks(batch, self._steps(inner_steps, steps), per_step=True, create_graph=False)

    def adapt_tasks(self, batch, inner_steps: Optional[int] = None, per_step: bool = False):
        """``(MetaOutput, fast weights)``: every task of ``batch`` adapted for ``inner_steps`` steps
        without a graph and scored on its query set (per step if ``per_step``), and each task's
        final weights (a leading task axis). Touches no meta-parameter or buffer."""
        steps = self.inner_steps if inner_steps is None else inner_steps
        with torch.no_grad(), evaluating(self.model):
            return self._run_tasks(batch, steps, per_step=per_step, create_graph=False, keep_weights=True)

    def _is_task_batched(self, support_x, support_y) -> bool:
        # Class labels are [S] for one task; regression targets carry a feature axis, [S, D].
        return support_y.dim() == (2 if self.classification else 3)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, inner_steps: Optional[int] = None, *,
              steps: Optional[int] = None) -> Params:
        """Fast weights adapted to one task (``support_x`` ``[S, ...]``) or to a batch of tasks
        (``[T, S, ...]``, giving weights with a leading task axis).

        Differentiable w.r.t. the meta-parameters when gradients are enabled (second order unless
        the algorithm is first order). Touches neither the meta-parameters nor any buffer.
        """
        steps = self._steps(inner_steps, steps)
        params, buffers = self.meta_params(), self.model_buffers()
        create_graph = self.create_graph() and torch.is_grad_enabled()

        def run(sx, sy):
            fast = params
            for fast in self.inner_loop(params, buffers, sx, sy, steps, create_graph):
                pass
            return fast

        with self.forward_context():
            if self._is_task_batched(support_x, support_y):
                return vmap(run, randomness="different")(support_x, support_y)
            return run(support_x, support_y)

    def predict(self, fast_weights: Params, x: torch.Tensor, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's output on ``x`` with adapted weights; batched weights take ``x`` as ``[T, N, ...]``.

        Under batch statistics the rows of ``x`` are normalised together (the transductive
        protocol). With ``reference`` (``[R, ...]``, or ``[T, R, ...]`` for batched weights;
        typically the support set) every BatchNorm normalises ``x`` with the statistics of
        ``reference`` instead, in the same pass, so each output depends on its own row only."""
        buffers = self.model_buffers()
        name, reference_weight = next(iter(self.model.named_parameters()))
        batched = fast_weights[name].dim() == reference_weight.dim() + 1
        policy = self.forward_policy()
        if reference is not None:
            rows = reference.shape[1 if batched else 0]
            x = torch.cat([reference.to(x.dtype), x], dim=1 if batched else 0)
            policy = dataclasses.replace(policy, reference_rows=rows)

        def output(p, xs):
            out = self.task_output(p, buffers, xs)
            return out if reference is None else out[rows:]

        with forward.applied(self.model, policy):
            if batched:
                return vmap(output, randomness="different")(fast_weights, x)
            return output(fast_weights, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model with its meta-parameters (before any step), under the same BatchNorm policy
        as adaptation."""
        with self.forward_context():
            return self.forward_with(self.initial_weights(self.meta_params()), self.model_buffers(), x)
