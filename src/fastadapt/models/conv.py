"""The four-block convolutional network of the MAML paper (Finn et al. 2017, section 5.2)."""

from __future__ import annotations

import torch
from torch import nn


class SpatialMean(nn.Module):
    """Average over the spatial axes: ``[N, C, H, W] -> [N, C]``. (``AdaptiveAvgPool2d(1)`` does
    the same but falls back to a slow path under ``vmap`` on channels-last inputs.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Conv4(nn.Module):
    """Four blocks of 3x3 conv -> BatchNorm -> ReLU, then a linear head.

    The convolutions have no bias: BatchNorm's shift makes it redundant, its true gradient is
    zero, and Adam would turn the rounding noise of that zero into full-size updates.

    ``features`` maps images to a flat embedding and ``head`` maps that to logits, so algorithms
    that adapt only the head (ANIL) or only embed (ProtoNets) can address the two parts by name.
    """

    def __init__(self, in_channels: int = 1, n_way: int = 5, hidden: int = 64,
                 image_size: int = 28, pool: str = "stride"):
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"conv4: pool must be 'stride' or 'max', got {pool!r}")
        for name, value in (("in_channels", in_channels), ("n_way", n_way), ("hidden", hidden),
                            ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"conv4: {name} must be a positive integer, got {value!r}")
        blocks = []
        channels = in_channels
        size = image_size
        for _ in range(4):
            if pool == "stride":
                blocks += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(hidden), nn.ReLU()]
                size = (size - 1) // 2 + 1
            else:
                blocks += [nn.Conv2d(channels, hidden, 3, stride=1, padding=1, bias=False),
                           nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
                size = size // 2
            channels = hidden
        if size < 1:
            raise ValueError(f"conv4: image_size={image_size} is too small for four blocks")
        if pool == "stride":
            # Features are averaged over the last spatial map (2x2 for 28x28 inputs).
            blocks += [SpatialMean()]
            out_features = hidden
        else:
            blocks += [nn.Flatten()]
            out_features = hidden * size * size
        self.pool = pool
        self.out_features = out_features
        # what rebuilds it: a run trained in Python records these in its configuration
        self.spec = dict(in_channels=in_channels, n_way=n_way, hidden=hidden, image_size=image_size, pool=pool)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(out_features, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv4(in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28,
          pool: str = "stride") -> Conv4:
    """Build the MAML paper's conv4.

    ``pool="stride"`` is the Omniglot variant (stride-2 convs, 28 -> 14 -> 7 -> 4 -> 2, features
    averaged over the final 2x2); ``pool="max"`` is the miniImageNet variant (stride-1 convs each
    followed by a 2x2 max-pool, 84 -> 42 -> 21 -> 10 -> 5, flattened; use ``hidden=32``).
    """
    return Conv4(in_channels, n_way, hidden, image_size, pool)
