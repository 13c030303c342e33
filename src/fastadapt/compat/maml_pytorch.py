"""Drop-in classes for scripts written against the MAML-Pytorch reference code.

Scripts that build ``Learner(config, imgc, imgsz)`` and ``Meta(args, config)`` and call
``maml(x_spt, y_spt, x_qry, y_qry)`` and ``maml.finetunning(...)`` run unchanged, with two
differences a user of that code should know:

- **Second order.** The reference calls ``torch.autograd.grad`` in its inner loop without
  ``create_graph=True``, so its meta-gradient is silently first order. ``Meta`` differentiates
  through the inner steps; set ``args.first_order = True`` for the reference's behaviour.
- **Vectorised.** ``Meta`` runs the tasks of a meta-batch through fastadapt's engine (one
  ``torch.func.vmap``) instead of a Python loop with a ``deepcopy`` per fine-tuned task; the
  numbers are the same, the time is not.

BatchNorm as in the reference: every pass of ``Meta`` normalises with the batch's own statistics;
unlike the reference, neither meta-training nor ``finetunning`` writes the running statistics.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..algorithms import MAML
from ..data import TaskBatch
from ..models.learner import Learner as _Network
from ..models.learner import reference_init_

_SHAPES = {
    "conv2d": lambda a: f"conv2d:(ch_in:{a[1]}, ch_out:{a[0]}, k:{a[2]}x{a[3]}, stride:{a[4]}, padding:{a[5]})",
    "convt2d": lambda a: f"convTranspose2d:(ch_in:{a[0]}, ch_out:{a[1]}, k:{a[2]}x{a[3]}, stride:{a[4]}, "
                         f"padding:{a[5]})",
    "linear": lambda a: f"linear:(in:{a[1]}, out:{a[0]})",
    "leakyrelu": lambda a: f"leakyrelu:(slope:{a[0]})",
    "avg_pool2d": lambda a: f"avg_pool2d:(k:{a[0]}, stride:{a[1]}, padding:{a[2]})",
    "max_pool2d": lambda a: f"max_pool2d:(k:{a[0]}, stride:{a[1]}, padding:{a[2]})",
}


class Learner(nn.Module):
    """The reference code's ``Learner(config, imgc, imgsz)`` and its call contract.

    - ``forward(x, vars=None, bn_training=True)``: ``vars`` is a list of weights in parameter
      order (``None``: the module's own); ``bn_training=True`` normalises with the batch's
      statistics (and, called directly in training mode, updates the running ones, as the
      reference does), ``False`` with the running statistics.
    - ``parameters()`` returns the list of weights (subscriptable, as in the reference);
      ``vars`` is the same list and ``vars_bn`` the running means and variances, two per
      BatchNorm layer.
    - ``zero_grad(vars=None)`` zeroes the gradients of ``vars`` (default: its own).
    - Initialisation as the reference: Kaiming-normal weights, zero biases, BatchNorm weight 1.

    Inside it is an ordinary module (``self.net``, a ``fastadapt.models.Learner``), so fastadapt's
    engine and every algorithm run it functionally. ``imgc`` and ``imgsz`` are kept for the record.
    """

    def __init__(self, config, imgc: int, imgsz: int):
        super().__init__()
        self.config = [(name, list(args)) for name, args in config]
        self.imgc, self.imgsz = imgc, imgsz
        self.net = reference_init_(_Network(self.config))

    @property
    def vars(self) -> List[nn.Parameter]:
        return [p for _, p in self.net.named_parameters()]

    @property
    def vars_bn(self) -> List[torch.Tensor]:
        found = []
        for module in self.net.modules():
            if isinstance(module, _BatchNorm):
                found += [module.running_mean, module.running_var]
        return found

    def parameters(self, recurse: bool = True) -> List[nn.Parameter]:  # noqa: D401 - the reference's contract
        """The list of weights, in config order (the reference returns its ``ParameterList``)."""
        return self.vars

    def zero_grad(self, vars: Optional[Sequence[torch.Tensor]] = None, set_to_none: bool = False) -> None:
        with torch.no_grad():
            for p in (self.vars if vars is None else vars):
                if p.grad is not None:
                    p.grad.zero_()

    def _set_bn_training(self, flag: bool) -> List[bool]:
        modes = []
        for module in self.net.modules():
            if isinstance(module, _BatchNorm):
                modes.append(module.training)
                module.training = flag
        return modes

    def forward(self, x: torch.Tensor, vars: Optional[Sequence[torch.Tensor]] = None,
                bn_training: bool = True) -> torch.Tensor:
        if vars is not None:
            names = [name for name, _ in self.net.named_parameters()]
            if len(vars) != len(names):
                raise ValueError(f"Learner.forward: vars has {len(vars)} tensors, the network has {len(names)}")
        modes = self._set_bn_training(bn_training)
        try:
            if vars is None:
                return self.net(x)
            return functional_call(self.net, dict(zip(names, vars)), (x,))
        finally:
            for module, mode in zip((m for m in self.net.modules() if isinstance(m, _BatchNorm)), modes):
                module.training = mode

    def extra_repr(self) -> str:
        lines = []
        for name, args in self.config:
            if name in _SHAPES:
                lines.append(_SHAPES[name](args))
            elif name == "bn":
                lines.append(f"bn:(channels:{args[0]})")
            else:
                lines.append(f"{name}:{tuple(args)}")
        return f"imgc={self.imgc}, imgsz={self.imgsz},\n" + "\n".join(lines)


def _field(args, name: str):
    try:
        return getattr(args, name)
    except AttributeError as error:
        raise ValueError(f"Meta: args has no field {name!r} (the reference's argparse options: update_lr, "
                         "meta_lr, n_way, k_spt, k_qry, task_num, update_step, update_step_test, imgc, imgsz)") \
            from error


class Meta(nn.Module):
    """The reference code's ``Meta(args, config)``: meta-learner and its Adam optimiser.

    Reads ``args.update_lr, meta_lr, n_way, k_spt, k_qry, task_num, update_step,
    update_step_test, imgc, imgsz`` and, optionally, ``first_order`` (default False: second
    order, see the module docstring).

    - ``forward(x_spt, y_spt, x_qry, y_qry)`` with ``[task_num, setsz, c, h, w]`` images and
      ``[task_num, setsz]`` labels: one meta-update (Adam on the mean final query loss), and
      the query accuracy over all tasks before adapting and after each of the ``update_step``
      steps, a NumPy array of ``update_step + 1``, as the reference returns.
    - ``finetunning(x_spt, y_spt, x_qry, y_qry)`` with one task (no task axis): the query
      accuracy before and after each of ``update_step_test`` steps; touches no parameter or buffer.
    """

    def __init__(self, args, config):
        super().__init__()
        self.update_lr, self.meta_lr = float(_field(args, "update_lr")), float(_field(args, "meta_lr"))
        self.n_way, self.k_spt, self.k_qry = _field(args, "n_way"), _field(args, "k_spt"), _field(args, "k_qry")
        self.task_num = _field(args, "task_num")
        self.update_step, self.update_step_test = _field(args, "update_step"), _field(args, "update_step_test")
        self.first_order = bool(getattr(args, "first_order", False))
        self.maml = MAML(Learner(config, _field(args, "imgc"), _field(args, "imgsz")), inner_lr=self.update_lr,
                         inner_steps=self.update_step, first_order=self.first_order)
        self.meta_optim = torch.optim.Adam(self.maml.parameters(), lr=self.meta_lr)

    @property
    def net(self) -> Learner:
        return self.maml.model

    def forward(self, x_spt, y_spt, x_qry, y_qry) -> np.ndarray:
        batch = TaskBatch(x_spt, y_spt, x_qry, y_qry)
        self.meta_optim.zero_grad()
        out = self.maml.meta_backward(batch, per_step=True)
        self.meta_optim.step()
        return out.query_accuracy.detach().cpu().numpy()

    def finetunning(self, x_spt, y_spt, x_qry, y_qry) -> np.ndarray:
        if x_spt.dim() != x_qry.dim() or y_spt.dim() != 1:
            raise ValueError(f"finetunning takes one task: x_spt [setsz, c, h, w] and y_spt [setsz], got "
                             f"{tuple(x_spt.shape)} and {tuple(y_spt.shape)}")
        batch = TaskBatch(x_spt[None], y_spt[None], x_qry[None], y_qry[None])
        out = self.maml.fine_tune(batch, inner_steps=self.update_step_test)
        return out.query_accuracy.detach().cpu().numpy()

    fine_tune = finetunning


__all__ = ["Learner", "Meta"]
