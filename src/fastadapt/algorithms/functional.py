"""The pieces every learner's inner loop (and rl/) is built from, as pure functions of weights.

``forward_with`` runs a module with given weights (``torch.func.functional_call``); ``grad_of``
differentiates a loss of weights, second order when asked; ``batch_statistics`` reads what each
BatchNorm layer normalises a batch with. They run under whatever ``forward.ForwardPolicy`` the
engine has entered; the one rule they add is BatchNorm's exact form for a pass that is
differentiated twice, chosen from ``create_graph``, so no algorithm has to know about it.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call

from . import forward

Params = Dict[str, torch.Tensor]


def detach(params: Params) -> Params:
    """The same weights cut from the graph (constants of the meta-gradient)."""
    return {name: value.detach() for name, value in params.items()}


def forward_with(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, *,
                 part: Optional[str] = None) -> torch.Tensor:
    """``model``'s output on ``x`` with the given weights (one task, no task axis); entries of
    ``params`` replace buffers of the same name. ``part``: run only that submodule, with its
    entries of ``params`` and ``buffers``."""
    module, state = model, {**buffers, **params}
    if part is not None:
        prefix = part + "."
        module = model.get_submodule(part)
        state = {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
    return functional_call(module, state, (x,))


def grad_of(loss_fn: Callable[[Params], torch.Tensor], params: Params, create_graph: bool) -> Params:
    """The gradient of ``loss_fn(params)`` w.r.t. ``params``.

    With ``create_graph`` the result stays differentiable w.r.t. whatever ``params`` depend on
    (second order), and BatchNorm is computed exactly: ``F.batch_norm``'s second derivatives
    under ``vmap`` are wrong (see ``forward.py``). Without it ``params`` are detached first, so no
    outer graph is recorded at all (first order)."""
    if not create_graph:
        return torch.func.grad(loss_fn)(detach(params))
    with forward.changed(exact=True):
        return torch.func.grad(loss_fn)(params)


def batch_statistics(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> list:
    """Each BatchNorm layer's (mean, unbiased variance) per channel over ``x``, in call order, from
    one forward pass of ``model`` with ``params`` normalising with the batch's own statistics."""
    with forward.changed(statistics="batch", record=[]) as policy:
        forward_with(model, params, buffers, x)
    return policy.record
