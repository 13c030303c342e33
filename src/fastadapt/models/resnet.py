"""ResNet-12, the few-shot literature's second standard backbone beside conv4 (MetaOptNet, Lee et
al. 2019; TADAM, Oreshkin et al. 2018: four residual blocks of widths 64-160-320-640)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv import SpatialMean

RESNET12_WIDTHS = (64, 160, 320, 640)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin and Le, NeurIPS 2018): in training, zero square blocks of
    ``block_size`` (at most the feature map's side) so that about ``drop_prob`` of the units are
    dropped, and rescale the rest; the identity in evaluation. Its masks are drawn from torch's
    generator, per task under ``vmap(randomness="different")``."""

    def __init__(self, drop_prob: float = 0.0, block_size: int = 5):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropBlock: drop_prob must be in [0, 1), got {drop_prob!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"DropBlock: block_size must be a positive integer, got {block_size!r}")
        self.drop_prob, self.block_size = float(drop_prob), block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        # block centres are drawn where a whole block fits, at the rate that drops drop_prob of the units
        valid = (height - size + 1) * (width - size + 1)
        gamma = self.drop_prob * height * width / (size * size * valid)
        centres = torch.bernoulli(torch.full((*x.shape[:-2], height - size + 1, width - size + 1), gamma,
                                             dtype=x.dtype, device=x.device))
        pad = size - 1
        blocks = F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), size, stride=1)
        keep = 1.0 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """Three 3x3 conv -> BatchNorm (-> LeakyReLU 0.1) layers beside a 1x1 conv -> BatchNorm
    shortcut, their sum through LeakyReLU, a 2x2 max-pool, then DropBlock."""

    def __init__(self, in_channels: int, out_channels: int, drop_prob: float = 0.0, block_size: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.drop = DropBlock(drop_prob, block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.drop(F.max_pool2d(out, 2))


class ResNet12(nn.Module):
    """Four ``ResidualBlock``s of ``widths``, features averaged over the last map, a linear head.

    Like ``Conv4`` it has ``features`` (images -> ``[N, widths[-1]]``) and ``head`` (-> logits), so
    every learner that addresses the two parts (ANIL, ProtoNet, the pretrained heads) works on it.
    DropBlock (``drop_prob`` > 0) is applied after the last two blocks, as MetaOptNet does. Images
    must be at least 16 pixels wide (four halvings)."""

    def __init__(self, in_channels: int = 1, n_way: int = 5, widths: Sequence[int] = RESNET12_WIDTHS,
                 image_size: int = 28, drop_prob: float = 0.0, block_size: int = 5):
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"resnet12: widths must be four positive integers, got {widths!r}")
        for name, value in (("in_channels", in_channels), ("n_way", n_way), ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"resnet12: {name} must be a positive integer, got {value!r}")
        if image_size < 16:
            raise ValueError(f"resnet12: image_size={image_size} is too small for four 2x2 poolings (at least 16)")
        blocks, channels = [], in_channels
        for index, width in enumerate(widths):
            blocks.append(ResidualBlock(channels, width, drop_prob if index >= 2 else 0.0, block_size))
            channels = width
        self.features = nn.Sequential(*blocks, SpatialMean())
        self.out_features = widths[-1]
        self.head = nn.Linear(widths[-1], n_way)
        self.spec = dict(backbone="resnet12", in_channels=in_channels, n_way=n_way, widths=list(widths),
                         image_size=image_size, drop_prob=drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet12(in_channels: int = 1, n_way: int = 5, widths: Sequence[int] = RESNET12_WIDTHS,
             image_size: int = 28, drop_prob: float = 0.0) -> ResNet12:
    """Build ResNet-12 (MetaOptNet's widths by default; narrower ones train much faster on a CPU)."""
    return ResNet12(in_channels, n_way, widths, image_size, drop_prob)
