"""The four-block convolutional network of the MAML paper (Finn et al. 2017, section 5.2)."""

from __future__ import annotations

import torch
from torch import nn


class SpatialMean(nn.Module):
    """Average over the spatial axes: ``[N, C, H, W] -> [N, C]``. (``AdaptiveAvgPool2d(1)`` does
    the same but falls back to a slow path under ``vmap`` on channels-last inputs.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class TaskNorm2d(nn.BatchNorm2d):
    """BatchNorm whose statistics blend the context's (the batch's, or under the engine's support
    mode the support set's) with each image's own over its spatial positions, with a learned
    weight: TaskNorm-I (Bronskill et al., ICML 2020). ``alpha = sigmoid(blend)``;
    ``mean = alpha * context_mean + (1 - alpha) * image_mean`` and the variance of that mixture,
    ``alpha * (context_var + (context_mean - mean)^2) + (1 - alpha) * (image_var + (image_mean - mean)^2)``.
    An image's part of its own normalisation does not depend on the other images, which is what
    a model classifying one image at a time needs (issue #21). ``blend`` starts at ``init_blend``
    (2.0: alpha 0.88, close to BatchNorm). There are no running statistics; the engine's forward
    policy calls ``normalise`` with its reference rows (``algorithms.forward``)."""

    def __init__(self, num_features: int, init_blend: float = 2.0):
        super().__init__(num_features, track_running_stats=False)
        self.blend = nn.Parameter(torch.tensor(float(init_blend)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(x)

    def normalise(self, x: torch.Tensor, reference_rows=None) -> torch.Tensor:
        """``x`` ``[N, C, H, W]`` normalised with the statistics of its first ``reference_rows``
        rows (default all) blended with each row's own."""
        if x.dim() < 3:
            raise ValueError(f"TaskNorm2d needs spatial positions ([N, C, H, W]), got a {x.dim()}-D input")
        context = x if reference_rows is None else x[:reference_rows]
        context_var, context_mean = torch.var_mean(context, dim=[0, *range(2, x.dim())], correction=0, keepdim=True)
        image_var, image_mean = torch.var_mean(x, dim=list(range(2, x.dim())), correction=0, keepdim=True)
        alpha = torch.sigmoid(self.blend)
        mean = alpha * context_mean + (1 - alpha) * image_mean
        var = alpha * (context_var + (context_mean - mean) ** 2) + (1 - alpha) * (image_var + (image_mean - mean) ** 2)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps) * self.weight.reshape(shape)
        return torch.addcmul(self.bias.reshape(shape) - mean * scale, x, scale)


NORMS = ("batch", "tasknorm")


class Conv4(nn.Module):
    """Four blocks of 3x3 conv -> BatchNorm -> ReLU, then a linear head.

    The convolutions have no bias: BatchNorm's shift makes it redundant, its true gradient is
    zero, and Adam would turn the rounding noise of that zero into full-size updates.

    ``features`` maps images to a flat embedding and ``head`` maps that to logits, so algorithms
    that adapt only the head (ANIL) or only embed (ProtoNets) can address the two parts by name.
    """

    def __init__(self, in_channels: int = 1, n_way: int = 5, hidden: int = 64,
                 image_size: int = 28, pool: str = "stride", norm: str = "batch"):
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"conv4: pool must be 'stride' or 'max', got {pool!r}")
        if norm not in NORMS:
            raise ValueError(f"conv4: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        make_norm = nn.BatchNorm2d if norm == "batch" else TaskNorm2d
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
                           make_norm(hidden), nn.ReLU()]
                size = (size - 1) // 2 + 1
            else:
                blocks += [nn.Conv2d(channels, hidden, 3, stride=1, padding=1, bias=False),
                           make_norm(hidden), nn.ReLU(), nn.MaxPool2d(2)]
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
        self.spec = dict(in_channels=in_channels, n_way=n_way, hidden=hidden, image_size=image_size, pool=pool,
                         norm=norm)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(out_features, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv4(in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28,
          pool: str = "stride", norm: str = "batch") -> Conv4:
    """Build the MAML paper's conv4.

    ``pool="stride"`` is the Omniglot variant (stride-2 convs, 28 -> 14 -> 7 -> 4 -> 2, features
    averaged over the final 2x2); ``pool="max"`` is the miniImageNet variant (stride-1 convs each
    followed by a 2x2 max-pool, 84 -> 42 -> 21 -> 10 -> 5, flattened; use ``hidden=32``).
    ``norm="tasknorm"``: ``TaskNorm2d`` instead of BatchNorm (statistics blended with each image's).
    """
    return Conv4(in_channels, n_way, hidden, image_size, pool, norm)
