"""Augmentation of training episodes: small random affine changes of each image."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class RandomAffine:
    """Shift, scale and rotate every image of a meta-batch by its own small random amount.

    ``shift``: the largest translation, as a fraction of the image side (0.1 of 28 px: 2.8 px);
    ``scale``: the range of the zoom factor; ``rotation``: the largest angle in degrees. Pixels
    from outside the image are 0 (the background of inverted Omniglot and Glyphs images).
    Randomness comes from the sampler's per-episode generator, so an episode is the same every
    time it is drawn. Meant for meta-training episodes; evaluation stays unaugmented.
    """

    def __init__(self, shift: float = 0.1, scale=(0.9, 1.1), rotation: float = 10.0):
        if not 0 <= shift < 1 or not 0 < scale[0] <= scale[1] or not 0 <= rotation <= 180:
            raise ValueError(f"RandomAffine: need 0 <= shift < 1, 0 < scale[0] <= scale[1], 0 <= rotation <= 180; "
                             f"got shift={shift}, scale={scale}, rotation={rotation}")
        self.shift, self.scale, self.rotation = float(shift), (float(scale[0]), float(scale[1])), float(rotation)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n = images.shape[0]
        angle = np.deg2rad(rng.uniform(-self.rotation, self.rotation, n))
        zoom = rng.uniform(*self.scale, n)
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of s image sides is 2s
        move = rng.uniform(-self.shift, self.shift, (n, 2)) * 2
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        theta = np.stack([np.stack([cos, -sin, move[:, 0]], 1), np.stack([sin, cos, move[:, 1]], 1)], 1)
        grid = F.affine_grid(torch.as_tensor(theta, dtype=images.dtype), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomAffine(shift={self.shift}, scale={self.scale}, rotation={self.rotation})"


__all__ = ["RandomAffine"]
