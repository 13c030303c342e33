"""Augmentation of training episodes: small random affine changes of each image, and for
handwriting the changes one writer's hand makes to another's (stroke width, local warps)."""

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
        theta = torch.as_tensor(theta, dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomAffine(shift={self.shift}, scale={self.scale}, rotation={self.rotation})"


class StrokeStyle:
    """Draw each character as another hand might: a smooth random warp and a random stroke width.

    Lake's protocol asks a model to match one drawer's character with another drawer's; two
    drawings of a character differ by pen width and by local bends that no global affine change
    makes. ``warp``: the standard deviation of the displacement at each point of a coarse
    ``grid`` x ``grid`` lattice, as a fraction of the image side (0.04 of 28 px: about 1.1 px),
    interpolated smoothly over the image. ``width``: the largest blend towards the image dilated
    (thicker strokes) or eroded (thinner) by a 3 x 3 neighbourhood; strokes are the bright pixels
    (Omniglot is inverted on loading), erosion is blended at half strength so thin strokes do not
    vanish. Randomness comes from the sampler's per-episode generator, as for ``RandomAffine``.
    """

    def __init__(self, warp: float = 0.04, grid: int = 4, width: float = 0.6):
        if not 0 <= warp < 0.5 or not (isinstance(grid, int) and grid >= 2) or not 0 <= width <= 1:
            raise ValueError(f"StrokeStyle: need 0 <= warp < 0.5, an integer grid >= 2, 0 <= width <= 1; "
                             f"got warp={warp}, grid={grid}, width={width}")
        self.warp, self.grid, self.width = float(warp), grid, float(width)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        coarse = torch.as_tensor(rng.normal(0.0, self.warp * 2, (n, 2, self.grid, self.grid)), dtype=images.dtype,
                                 device=images.device)
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        identity = F.affine_grid(torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(n, 2, 3), list(images.shape),
                                 align_corners=False)
        warped = F.grid_sample(images, identity + field.permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        blend = torch.as_tensor(rng.uniform(-self.width, self.width, n), dtype=images.dtype,
                                device=images.device).view(n, 1, 1, 1)
        thicker = F.max_pool2d(warped, 3, stride=1, padding=1)
        thinner = -F.max_pool2d(-warped, 3, stride=1, padding=1)
        return torch.where(blend >= 0, warped + blend * (thicker - warped),
                           warped + 0.5 * blend.abs() * (thinner - warped))

    def __repr__(self) -> str:
        return f"StrokeStyle(warp={self.warp}, grid={self.grid}, width={self.width})"


class Compose:
    """Apply augmentations in turn, each with the same per-episode generator."""

    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for step in self.steps:
            images = step(images, rng)
        return images

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.steps))})"


def training_augmentation(augment: bool, strokes: bool = False):
    """The augmentation a run's configuration asks for (``DataConfig.augment`` and
    ``augment_strokes``), or None."""
    steps = ([RandomAffine()] if augment else []) + ([StrokeStyle()] if strokes else [])
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else Compose(*steps)


def view_augmentation(augment: bool, strokes: bool = False):
    """The copies test-time augmentation draws for a run (``eval --tta``, ``Predictor.load(views=)``):
    as its training augmentation, or ``RandomAffine`` for a run trained without any."""
    return training_augmentation(augment, strokes) or RandomAffine()


__all__ = ["RandomAffine", "StrokeStyle", "Compose", "training_augmentation", "view_augmentation"]
