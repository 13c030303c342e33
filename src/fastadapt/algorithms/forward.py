"""How every forward pass the engine makes runs: BatchNorm's statistics and small convolutions.

One ``ForwardPolicy`` says it all, and ``applied(model, policy)`` (entered by the engine, never by
an algorithm) makes the model follow it for a block:

- ``statistics="batch"`` (the MAML paper's transductive policy): BatchNorm normalises with the
  statistics of its own batch, per task under vmap; running statistics are never read or written,
  so meta-training and adaptation leave every buffer untouched. With ``reference_rows=R`` the
  statistics come from the first ``R`` rows of each batch only (a support set placed before the
  images to classify), so every later row is normalised independently of the others.
  ``"running"``: it normalises with
  the module's ``running_mean``/``running_var`` as ``functional_call`` substitutes them (MAML++'s
  per-step statistics), so one image is classified the same alone or in a batch.
- ``update_running``: batch statistics, and the module's running statistics updated from them
  as torch's BatchNorm does in training mode (ordinary classification training, whose network
  is then tested with ``"running"``).
- ``exact``: the normalisation is computed from mean and variance directly. Needed where the pass
  is differentiated twice under vmap (a second-order inner loop's support pass): ``F.batch_norm``'s
  second-order gradients under ``vmap`` are silently wrong (functorch issue 534; 0.14 absolute
  error on this project's float64 test). Elsewhere the fused ``F.batch_norm`` is exact to first
  order and about 2x faster.
- ``record``: a list to which every BatchNorm pass appends its batch's (mean, unbiased variance).
- ``matmul_convolutions``: on CPU, convolutions with few inputs per output run as unfold + matmul.

The engine switches ``exact`` and ``record`` for one pass with ``changed(...)``; the current
policy is per thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class ForwardPolicy:
    statistics: str = "batch"
    exact: bool = False
    record: Optional[list] = None
    matmul_convolutions: bool = True
    reference_rows: Optional[int] = None
    update_running: bool = False

    def __post_init__(self):
        if self.statistics not in ("batch", "running"):
            raise ValueError(f"ForwardPolicy.statistics must be 'batch' or 'running', got {self.statistics!r}")
        if self.reference_rows is not None and self.reference_rows < 1:
            raise ValueError(f"ForwardPolicy.reference_rows must be a positive row count, got {self.reference_rows!r}")


class _Current(threading.local):
    def __init__(self):
        # an instance attribute (not only the class's), so torch.compile's guards see a stable dict
        self.policy = ForwardPolicy()


_CURRENT = _Current()


def current() -> ForwardPolicy:
    return _CURRENT.policy


@contextlib.contextmanager
def changed(**fields):
    """Within the block, the current policy with ``fields`` replaced; yields the new policy."""
    previous = _CURRENT.policy
    _CURRENT.policy = dataclasses.replace(previous, **fields)
    try:
        yield _CURRENT.policy
    finally:
        _CURRENT.policy = previous


@contextlib.contextmanager
def applied(model: nn.Module, policy: ForwardPolicy):
    """Make every BatchNorm and small convolution of ``model`` follow ``policy`` for the block.

    Re-entrant: a module already patched by an enclosing block keeps that patch, and the inner
    policy is current until the inner block ends."""
    previous = _CURRENT.policy
    with _patched_forwards(model, lambda m: isinstance(m, _BatchNorm), _batch_norm), \
            _patched_forwards(model, uses_matmul, _convolve):
        _CURRENT.policy = policy
        try:
            yield policy
        finally:
            _CURRENT.policy = previous


def _batch_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    policy = _CURRENT.policy
    dims = [0, *range(2, x.dim())]
    if hasattr(type(module), "normalise"):  # TaskNorm (models.TaskNorm2d): its own statistics, this policy's rows
        if policy.statistics == "running" or policy.update_running:
            raise ValueError("TaskNorm (--norm tasknorm) keeps no running statistics: it serves learners that "
                             "normalise with batch or support statistics, not running ones")
        return module.normalise(x, policy.reference_rows)
    if policy.record is not None:
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=1 if count > 1 else 0)
        policy.record.append((mean, var))
    running = policy.statistics == "running"
    reference = None if running else policy.reference_rows
    if policy.update_running and not running and module.running_mean is not None:
        momentum = 0.1 if module.momentum is None else module.momentum
        return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, True, momentum,
                            module.eps)
    if not (policy.exact or running or reference):
        return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if running:
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    else:
        var, mean = torch.var_mean(x if reference is None else x[:reference], dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + module.eps)
    if module.affine:
        scale = scale * module.weight.reshape(shape)
        return torch.addcmul(module.bias.reshape(shape) - mean * scale, x, scale)
    return (x - mean) * scale


_MATMUL_CONV_MAX_INPUTS = 16  # in_channels * kernel area at or below which im2col wins on CPU


def _convolve(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution with few input values per output (an image network's first layer: one
    channel, 3x3) as unfold + one matrix product, with a channels-last result.

    oneDNN's CPU kernels are slow on such shapes: on this project's machine, conv4's first layer
    over 75 Omniglot images takes 4.0 ms as a convolution and 0.5 ms this way, and under vmap
    (per-task weights, a grouped convolution) 19 ms against 3.7 ms for 4 tasks.
    """
    if x.is_cuda or x.dim() != 4 or not _CURRENT.policy.matmul_convolutions:
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


def uses_matmul(module: nn.Module) -> bool:
    """Whether ``applied`` runs this module as unfold + matmul on CPU."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and module.in_channels * module.kernel_size[0] * module.kernel_size[1] <= _MATMUL_CONV_MAX_INPUTS)


@contextlib.contextmanager
def _patched_forwards(model: nn.Module, applies: Callable[[nn.Module], bool], forward: Callable):
    """Give every module of ``model`` for which ``applies`` holds the instance method ``forward``
    for the duration of the block. A module already patched is left alone."""
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
