"""The shared engine of every gradient-based meta-learner.

An algorithm describes ONE task: ``inner_loop`` yields its fast weights after each inner step,
written as a pure function of (params, buffers, support set). This base class maps that over the
task axis with ``torch.func.vmap``, runs tasks in chunks to bound memory and keep the working set
in cache, scores the query set, and reduces over tasks. It never deep-copies or clones the model.

BatchNorm policy (transductive, as in the MAML paper): every forward pass the engine makes
normalises with the statistics of its own batch, per task; running statistics are never read or
written, so meta-training and adaptation leave every buffer untouched. Where the pass will be
differentiated twice (the support pass of a second-order inner loop) the normalisation is computed
from mean and variance directly: ``F.batch_norm``'s second-order gradients under ``vmap`` are
silently wrong (functorch issue 534; 0.14 absolute error on this project's float64 test). Every
other pass uses the fused ``F.batch_norm``, which is exact to first order and about 2x faster.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

Params = Dict[str, torch.Tensor]


@dataclass
class MetaOutput:
    """What a meta-batch produced.

    ``loss``: scalar mean final query loss over tasks, differentiable w.r.t. the meta-parameters
    when produced by ``meta_loss``. ``query_loss`` / ``query_accuracy``: final-step means over
    tasks, or 1-D ``[steps + 1]`` per-step means (before adapting, then after each step) when
    per-step scoring was asked for. ``task_loss`` / ``task_accuracy``: the same per task
    (``[T]`` or ``[T, steps + 1]``), for confidence intervals. Accuracies are None for regression.
    """

    loss: torch.Tensor
    query_loss: torch.Tensor
    query_accuracy: Optional[torch.Tensor]
    task_loss: torch.Tensor
    task_accuracy: Optional[torch.Tensor]


class _BatchNormMode(threading.local):
    def __init__(self):
        # set on the instance (not only the class), so torch.compile's guards see a stable dict
        self.exact = False
        self.running = False  # normalise with the (substituted) running statistics instead
        self.found: Optional[list] = None  # when a list, batch statistics are appended to it


_BATCH_NORM_MODE = _BatchNormMode()


@contextlib.contextmanager
def _batch_norm_mode(flag: str, value):
    """Set one field of the thread's BatchNorm mode for the duration of the block."""
    previous = getattr(_BATCH_NORM_MODE, flag)
    setattr(_BATCH_NORM_MODE, flag, value)
    try:
        yield value
    finally:
        setattr(_BATCH_NORM_MODE, flag, previous)


def _exact_batch_norm():
    """Inside, BatchNorm is computed from mean and variance so its double backward is right."""
    return _batch_norm_mode("exact", True)


def _running_batch_norm(enabled: bool):
    """Inside, BatchNorm normalises with the module's running statistics (as substituted by
    ``functional_call``), not the batch's: non-transductive inference."""
    return _batch_norm_mode("running", enabled)


def _collect_batch_statistics():
    """Inside, every BatchNorm forward appends its batch's (mean, unbiased variance) per channel
    to the yielded list, in call order."""
    return _batch_norm_mode("found", [])


def _normalize_with_batch_statistics(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, x.dim())]
    if _BATCH_NORM_MODE.found is not None:
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=1 if count > 1 else 0)
        _BATCH_NORM_MODE.found.append((mean, var))
    if not (_BATCH_NORM_MODE.exact or _BATCH_NORM_MODE.running):
        # The fused kernel is exact for forward and first derivatives, and about 2x faster.
        return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if _BATCH_NORM_MODE.running:
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    else:
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + module.eps)
    if module.affine:
        scale = scale * module.weight.reshape(shape)
        return torch.addcmul(module.bias.reshape(shape) - mean * scale, x, scale)
    return (x - mean) * scale


@contextlib.contextmanager
def _patched_forwards(model: nn.Module, applies: Callable[[nn.Module], bool], forward: Callable):
    """Give every module of ``model`` for which ``applies`` holds the instance method ``forward``
    for the duration of the block. Re-entrant: a module already patched is left alone."""
    marker = f"_fastadapt_{forward.__name__}"
    patched = []
    for module in model.modules():
        if applies(module) and marker not in module.__dict__:
            module.__dict__[marker] = True
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.__dict__["forward"]
            del module.__dict__[marker]


def batch_statistics(model: nn.Module):
    """Run every BatchNorm module of ``model`` with batch statistics and no running-stat updates."""
    return _patched_forwards(model, lambda m: isinstance(m, _BatchNorm), _normalize_with_batch_statistics)


_MATMUL_CONV_MAX_INPUTS = 16  # in_channels * kernel area at or below which im2col wins on CPU


def _convolve_by_matmul(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution with few input values per output (an image network's first layer: one
    channel, 3x3) as unfold + one matrix product, with a channels-last result.

    oneDNN's CPU kernels are slow on such shapes: on this project's machine, conv4's first layer
    over 75 Omniglot images takes 4.0 ms as a convolution and 0.5 ms this way, and under vmap
    (per-task weights, a grouped convolution) 19 ms against 3.7 ms for 4 tasks.
    """
    if x.is_cuda or x.dim() != 4:
        return nn.Conv2d.forward(module, x)
    n, _, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    columns = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    weight = module.weight.reshape(module.out_channels, -1)
    out = columns.transpose(1, 2).reshape(n * out_h * out_w, -1) @ weight.t()
    if module.bias is not None:
        out = out + module.bias
    return out.reshape(n, out_h, out_w, module.out_channels).permute(0, 3, 1, 2)


def _uses_matmul(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and module.in_channels * module.kernel_size[0] * module.kernel_size[1] <= _MATMUL_CONV_MAX_INPUTS)


def small_convolutions_by_matmul(model: nn.Module):
    """Run the model's convolutions with few inputs per output through ``_convolve_by_matmul``."""
    return _patched_forwards(model, _uses_matmul, _convolve_by_matmul)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == targets).to(logits.dtype).mean()


_CPU_CHUNK_VALUES = 256 * 1024

_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def detach(params: Params) -> Params:
    return {name: value.detach() for name, value in params.items()}


class MetaLearner(nn.Module):
    """Base of every algorithm: owns batching over tasks (vmap), chunking and query scoring.

    Subclasses implement ``inner_loop``. ``task_chunk`` is the number of tasks run together in one
    vmapped call: ``"auto"`` picks by device (on CPU, chunks of about 256k input values, i.e. 4
    Omniglot tasks: per-task weights turn convolutions into slower grouped ones and a large working
    set falls out of cache; on GPU, all tasks at once), an int
    fixes it, and ``None`` runs the whole meta-batch at once. Results do not depend on it.
    """

    def __init__(self, model: nn.Module, inner_steps: int = 5, loss="cross_entropy",
                 task_chunk="auto", compile: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")
            self.loss_name, self.loss_fn = loss, _LOSSES[loss]
        elif callable(loss):
            self.loss_name, self.loss_fn = getattr(loss, "__name__", "custom"), loss
        else:
            raise ValueError(f"loss must be a name or a callable, got {loss!r}")
        if not (task_chunk is None or task_chunk == "auto" or (isinstance(task_chunk, int) and task_chunk > 0)):
            raise ValueError(f"task_chunk must be 'auto', None or a positive integer, got {task_chunk!r}")
        self.model = model
        self.inner_steps = inner_steps
        self.task_chunk = task_chunk
        self.use_compile = compile
        self.iteration = 0  # meta-iterations taken so far, for schedules inside the algorithm
        # None: vmap the query pass on GPU, loop over tasks on CPU (see _chunk_fn); tests force both.
        self.vmap_query: Optional[bool] = None
        self._compiled: Dict[tuple, Callable] = {}

    # ------------------------------------------------------------------ what an algorithm defines
    def inner_loop(self, params: Params, buffers: Params, support_x, support_y, steps: int,
                   create_graph: bool) -> Iterator[Params]:
        """Yield the fast weights of ONE task: first the starting weights, then after each step."""
        raise NotImplementedError

    # ------------------------------------------------------------------ functional building blocks
    @property
    def classification(self) -> bool:
        return self.loss_fn is F.cross_entropy

    def meta_params(self) -> Params:
        return dict(self.model.named_parameters())

    def model_buffers(self) -> Params:
        return dict(self.model.named_buffers())

    def forward_with(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` with the given weights (one task, no task axis); entries
        of ``params`` replace buffers of the same name (per-step statistics do)."""
        return functional_call(self.model, {**buffers, **params}, (x,))

    def step_view(self, params: Params, step: int) -> Params:
        """The weights a forward pass at inner step ``step`` uses (MAML++'s per-step BatchNorm
        substitutes its own entries); by default ``params`` themselves."""
        return params

    def uses_running_statistics(self) -> bool:
        """Whether BatchNorm normalises with running statistics instead of each batch's."""
        return False

    @contextlib.contextmanager
    def forward_context(self):
        """The BatchNorm policy (see the module docstring) and the convolution kernels of every
        forward pass the learner makes."""
        with batch_statistics(self.model), _running_batch_norm(self.uses_running_statistics()), \
                small_convolutions_by_matmul(self.model):
            yield

    def support_grad(self, params: Params, buffers: Params, x, y, create_graph: bool) -> Params:
        """Gradient of the loss on (x, y) w.r.t. ``params``.

        With ``create_graph`` the result stays differentiable w.r.t. the meta-parameters (second
        order); otherwise the weights are detached first, so no outer graph is even recorded.
        """
        def loss_of(p):
            return self.loss_fn(self.forward_with(p, buffers, x), y)

        if not create_graph:
            return torch.func.grad(loss_of)(detach(params))
        with _exact_batch_norm():
            return torch.func.grad(loss_of)(params)

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

    def _score(self, fast, buffers, query_x, query_y):
        """Query loss (differentiable) and accuracy of one task's weights."""
        out = self.forward_with(fast, buffers, query_x)
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
        score_all = vmap(self._score, in_dims=(0, None, 0, 0), randomness="different")

        def score(fast, buffers, query_x, query_y):
            if vmap_query:
                return score_all(fast, buffers, query_x, query_y)
            if query_x.dim() == 5 and query_x.shape[2] > 1:
                # channels-last images: faster convolutions and BatchNorm on CPU (one-channel
                # images go through _convolve_by_matmul, whose output is channels-last already)
                query_x = query_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            results = [self._score({n: w[i] for n, w in fast.items()}, buffers, query_x[i], query_y[i])
                       for i in range(query_x.shape[0])]
            return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

        def chunk(params, buffers, support_x, support_y, query_x, query_y, step_weights=None):
            scored = adapt(params, buffers, support_x, support_y)
            losses, accuracies, weighted = [], [], 0
            graph_from = len(scored) - (steps if multi_step else 1)
            for index, fast in enumerate(scored):
                with torch.set_grad_enabled(torch.is_grad_enabled() and index >= graph_from):
                    loss, accuracy = score(fast, buffers, query_x, query_y)
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

    def _run_chunks(self, batch, steps: int, per_step: bool, create_graph: bool,
                    on_chunk: Optional[Callable] = None, step_weights: Optional[torch.Tensor] = None):
        """Score ``batch`` chunk by chunk; ``on_chunk(final_losses, fast, num_tasks)`` is called on
        each chunk (to backpropagate it, say) and may return the losses to keep."""
        chunk = self._chunk_size(batch, with_graph=torch.is_grad_enabled())
        chunks = list(batch.split(chunk)) if chunk else [batch]
        params, buffers = self.meta_params(), self.model_buffers()
        vmap_query = batch.support_x.is_cuda if self.vmap_query is None else self.vmap_query
        multi_step = step_weights is not None and steps > 0
        fn = self._chunk_fn(steps, per_step or multi_step, create_graph, vmap_query, multi_step)
        finals, losses, accuracies = [], [], []
        with self.forward_context():
            for part in chunks:
                final, loss, acc, fast = fn(params, buffers, part.support_x, part.support_y,
                                            part.query_x, part.query_y, step_weights)
                if on_chunk is not None:
                    final = on_chunk(final, fast, batch.num_tasks)
                finals.append(final)
                losses.append(loss)
                accuracies.append(acc)
        final = torch.cat(finals).mean()
        task_loss, task_acc = torch.cat(losses), torch.cat(accuracies)
        if not per_step:
            task_loss, task_acc = task_loss[:, -1], task_acc[:, -1]
        task_acc = task_acc if self.classification else None
        return MetaOutput(loss=final, query_loss=task_loss.mean(0),
                          query_accuracy=None if task_acc is None else task_acc.mean(0),
                          task_loss=task_loss, task_accuracy=task_acc)

    # ------------------------------------------------------------------ public API
    def create_graph(self) -> bool:
        """Whether the inner loop is differentiated through (second order) in ``meta_loss``."""
        return True

    def step_loss_weights(self, steps: int) -> Optional[torch.Tensor]:
        """Weights of the query losses after steps 1..steps in the meta-loss; None: the last only."""
        return None

    def on_step(self, iteration: int) -> None:
        """Told by the Trainer before each meta-iteration (0-based), for annealing schedules."""
        self.iteration = iteration

    def meta_loss(self, batch, per_step: bool = False) -> MetaOutput:
        """Mean query loss after adaptation over the tasks of ``batch``, differentiable.

        The graph of every chunk is kept until ``.loss.backward()``; ``meta_backward`` frees each
        chunk's graph as it goes and so bounds memory by one chunk.
        """
        return self._run_chunks(batch, self.inner_steps, per_step, self.create_graph(),
                                step_weights=self.step_loss_weights(self.inner_steps))

    def meta_backward(self, batch, per_step: bool = False) -> MetaOutput:
        """Accumulate the meta-gradient of ``meta_loss(batch).loss`` into ``.grad``, chunk by chunk."""
        def backward(final, fast, num_tasks):
            (final.sum() / num_tasks).backward()
            return final.detach()

        return self._run_chunks(batch, self.inner_steps, per_step, self.create_graph(), backward,
                                step_weights=self.step_loss_weights(self.inner_steps))

    def make_optimizer(self, meta_lr: float) -> torch.optim.Optimizer:
        """The outer optimiser the Trainer uses: Adam at ``meta_lr`` (as in the MAML paper)."""
        return torch.optim.Adam(self.parameters(), lr=meta_lr)

    def fine_tune(self, batch, steps: Optional[int] = None) -> MetaOutput:
        """Adapt every task of ``batch`` for ``steps`` steps and score the query set after each.

        Runs without recording any graph and leaves the meta-parameters and buffers untouched.
        """
        steps = self.inner_steps if steps is None else steps
        with torch.no_grad():
            return self._run_chunks(batch, steps, per_step=True, create_graph=False)

    def _is_task_batched(self, support_x, support_y) -> bool:
        # Class labels are [S] for one task; regression targets carry a feature axis, [S, D].
        return support_y.dim() == (2 if self.classification else 3)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              steps: Optional[int] = None) -> Params:
        """Fast weights adapted to one task (``support_x`` ``[S, ...]``) or to a batch of tasks
        (``[T, S, ...]``, giving weights with a leading task axis).

        Differentiable w.r.t. the meta-parameters when gradients are enabled (second order unless
        the algorithm is first order). Touches neither the meta-parameters nor any buffer.
        """
        steps = self.inner_steps if steps is None else steps
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

    def predict(self, fast_weights: Params, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` with adapted weights; batched weights take ``x`` as ``[T, N, ...]``."""
        buffers = self.model_buffers()
        name, reference = next(iter(self.model.named_parameters()))
        with self.forward_context():
            if fast_weights[name].dim() == reference.dim() + 1:
                return vmap(lambda p, xs: self.forward_with(p, buffers, xs), randomness="different")(fast_weights, x)
            return self.forward_with(fast_weights, buffers, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model with its meta-parameters (before any step), under the same BatchNorm policy
        as adaptation."""
        with self.forward_context():
            return self.forward_with(self.step_view(self.meta_params(), 0), self.model_buffers(), x)
