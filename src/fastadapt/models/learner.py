"""``Learner``: a network described by the config list of the widely used MAML-Pytorch code.

The config is a list of ``(name, args)`` pairs such as ``("conv2d", [64, 1, 3, 3, 2, 0])``. Here it
builds an ordinary ``nn.Module`` (no hand-managed weight lists), so every algorithm accepts it and
its ``state_dict`` is a normal one. ``inplace`` flags are accepted for compatibility and ignored:
in-place activations cannot be differentiated through functionally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNorm(_BatchNorm):
    """Batch normalisation over channel axis 1 for inputs of any rank (``[N, C]`` or ``[N, C, ...]``)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects at least 2-D input [N, C, ...], got {input.dim()}-D")


class Reshape(nn.Module):
    """Reshape every example to ``shape``, keeping the batch axis."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self):
        return f"shape={self.shape}"


def _conv2d(a):
    out, inp, kh, kw, stride, pad = a
    return nn.Conv2d(inp, out, (kh, kw), stride=stride, padding=pad)


def _convt2d(a):
    inp, out, kh, kw, stride, pad = a
    return nn.ConvTranspose2d(inp, out, (kh, kw), stride=stride, padding=pad)


# name -> (allowed argument counts, human description, builder)
_LAYERS = {
    "conv2d": ((6,), "[out, in, kernel_h, kernel_w, stride, padding]", _conv2d),
    "convt2d": ((6,), "[in, out, kernel_h, kernel_w, stride, padding]", _convt2d),
    "linear": ((2,), "[out, in]", lambda a: nn.Linear(a[1], a[0])),
    "bn": ((1,), "[channels]", lambda a: BatchNorm(a[0])),
    "relu": ((0, 1), "[] or [inplace]", lambda a: nn.ReLU()),
    "leakyrelu": ((1, 2), "[slope] or [slope, inplace]", lambda a: nn.LeakyReLU(a[0])),
    "tanh": ((0,), "[]", lambda a: nn.Tanh()),
    "sigmoid": ((0,), "[]", lambda a: nn.Sigmoid()),
    "max_pool2d": ((3,), "[kernel, stride, padding]", lambda a: nn.MaxPool2d(a[0], a[1], a[2])),
    "avg_pool2d": ((3,), "[kernel, stride, padding]", lambda a: nn.AvgPool2d(a[0], a[1], a[2])),
    "flatten": ((0,), "[]", lambda a: nn.Flatten()),
    "reshape": (None, "[dim, ...] (at least one)", lambda a: Reshape(a)),
    "upsample": ((1,), "[scale_factor]", lambda a: nn.Upsample(scale_factor=a[0], mode="nearest")),
}


class Learner(nn.Sequential):
    """A sequential network built from a MAML-Pytorch style config list.

    >>> net = Learner([("linear", [40, 1]), ("relu", [True]), ("linear", [1, 40])])
    >>> net(torch.zeros(3, 1)).shape
    torch.Size([3, 1])
    """

    def __init__(self, config):
        layers = []
        for index, entry in enumerate(config):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"Learner config entry {index}: expected a (name, args) pair, got {entry!r}")
            name, args = entry
            if name not in _LAYERS:
                known = ", ".join(sorted(_LAYERS))
                raise ValueError(f"Learner config entry {index}: unknown layer {name!r}; expected one of {known}")
            arities, description, build = _LAYERS[name]
            args = list(args)
            if (arities is None and len(args) < 1) or (arities is not None and len(args) not in arities):
                raise ValueError(f"Learner config entry {index} ({name!r}): expected args {description}, "
                                 f"got {len(args)} value(s) {args!r}")
            layers.append(build(args))
        super().__init__(*layers)
        self.config = [(name, list(args)) for name, args in config]


def reference_init_(network: nn.Module) -> nn.Module:
    """The MAML-Pytorch reference code's initialisation, in place: Kaiming-normal weights (fan-in,
    ReLU gain) for convolutions, transposed convolutions and linear layers, zero biases, BatchNorm
    weight 1 and bias 0 (its conv4 first layer then has weights of std sqrt(2/9) = 0.47)."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, _BatchNorm) and module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
    return network


def load_network_config(path) -> list:
    """A config list from a JSON file (``[["conv2d", [64, 1, 3, 3, 2, 0]], ["relu", [true]], ...]``),
    checked by building it once; errors name the file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"network config {path} does not exist") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"network config {path}: not a JSON file ({error})") from error
    if not isinstance(config, list) or not config:
        raise ValueError(f"network config {path}: expected a non-empty JSON list of [name, args] pairs")
    try:
        Learner(config)
    except ValueError as error:
        raise ValueError(f"network config {path}: {error}") from error
    return [[name, list(args)] for name, args in config]


def omniglot_config(n_way: int):
    """The Omniglot network of the MAML-Pytorch reference code (28x28x1 -> n_way)."""
    cfg = [("conv2d", [64, 1, 3, 3, 2, 0]), ("relu", [True]), ("bn", [64])]
    cfg += [("conv2d", [64, 64, 3, 3, 2, 0]), ("relu", [True]), ("bn", [64])] * 2
    cfg += [("conv2d", [64, 64, 2, 2, 1, 0]), ("relu", [True]), ("bn", [64])]
    return cfg + [("flatten", []), ("linear", [n_way, 64])]


def miniimagenet_config(n_way: int):
    """The miniImageNet network of the MAML-Pytorch reference code (84x84x3 -> n_way)."""
    cfg = [("conv2d", [32, 3, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]), ("max_pool2d", [2, 2, 0])]
    for last in (False, False, True):
        cfg += [("conv2d", [32, 32, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]),
                ("max_pool2d", [2, 1 if last else 2, 0])]
    return cfg + [("flatten", []), ("linear", [n_way, 32 * 5 * 5])]


__all__ = ["Learner", "BatchNorm", "Reshape", "omniglot_config", "miniimagenet_config", "reference_init_",
           "load_network_config"]
