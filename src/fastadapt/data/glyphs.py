"""Glyphs: a synthetic, Omniglot-like character set generated in memory (no download).

Each class is a random character made of a few pen strokes (cubic Bezier curves); each example
redraws it with per-drawing noise: control-point jitter, stroke width, and a small rotation,
scaling and shift, rendered anti-aliased (drawn at 4x and downsampled). It is synthetic data for
first runs, smoke tests and offline demos, not a substitute for a real benchmark.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import Option
from .imageset import ImageSet, cached_array
from .source import DataSource
from .transform import ImageTransform

# Class identities of the splits live in disjoint ranges, so the splits never share a character.
_SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_SUPERSAMPLE = 4
_CURVE = np.linspace(0.0, 1.0, 24)[:, None]
_RENDERING = 1  # bumped whenever the drawing changes, so that no cache serves old images


def default_cache_folder() -> Path:
    """``$FASTADAPT_CACHE``, else ``~/.cache/fastadapt``."""
    return Path(os.environ.get("FASTADAPT_CACHE") or "~/.cache/fastadapt").expanduser()


def _character(rng: np.random.Generator) -> list:
    """Control points (4 x 2, in the unit square) of each stroke of one character."""
    strokes = []
    for _ in range(rng.integers(2, 5)):
        start = rng.uniform(0.15, 0.85, size=2)
        steps = rng.normal(0.0, 0.22, size=(3, 2))
        points = np.clip(start + np.cumsum(steps, axis=0), 0.1, 0.9)
        strokes.append(np.vstack([start, points]))
    return strokes


def _draw(strokes: list, size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = size * _SUPERSAMPLE
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    angle, scale = rng.uniform(-0.2, 0.2), rng.uniform(0.88, 1.12)
    shift = rng.uniform(-0.06, 0.06, size=2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    width = max(1, int(round(rng.uniform(0.06, 0.1) * canvas)))
    for control in strokes:
        p = control + rng.normal(0.0, 0.02, size=control.shape)
        t = _CURVE
        curve = ((1 - t) ** 3) * p[0] + 3 * ((1 - t) ** 2) * t * p[1] + 3 * (1 - t) * (t ** 2) * p[2] + (t ** 3) * p[3]
        curve = (curve - 0.5) @ rotation.T + 0.5 + shift
        xy = [tuple(q) for q in (curve * canvas).tolist()]
        draw.line(xy, fill=255, width=width, joint="curve")
        r = width / 2
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


@functools.lru_cache(maxsize=2048)
def _class_images(seed: int, identity: int, examples: int, size: int) -> np.ndarray:
    """The drawings of one character (read-only). Drawing is the slow part (about 1.5 ms an image),
    so each character is drawn once per process: a run's validation and test sets, an evaluation
    after training and a smaller set of the same seed share their characters' images."""
    strokes = _character(np.random.default_rng([seed, identity]))
    drawing = np.random.default_rng([seed, identity, 1])
    images = np.stack([_draw(strokes, size, drawing) for _ in range(examples)])
    images.setflags(write=False)
    return images


class Glyphs(ImageSet):
    """``num_classes`` synthetic characters with ``examples_per_class`` drawings each.

    ``split`` (``train``, ``val`` or ``test``) selects a disjoint range of characters; the same
    ``(seed, split, num_classes, examples_per_class, image_size)`` always gives the same images.
    Strokes are bright on a zero background, as in ``Omniglot``; as files (``predict``) they are
    taken to look like Omniglot's, dark strokes on white, and are inverted the same way.

    Drawing takes about 1.5 ms an image (4.5 s for a run's default validation and test sets), so
    the images are kept in an ``.npy`` file: ``cache=True`` (default) in ``default_cache_folder()``,
    a path for another folder, ``False`` for none. An unwritable folder just means no cache.
    """

    @staticmethod
    def default_transform(image_size: int = 28) -> ImageTransform:
        return ImageTransform(image_size, channels=1, resample="lanczos", invert=True, background="dark")

    def __init__(self, num_classes: int = 200, examples_per_class: int = 20, image_size: int = 28,
                 seed: int = 0, split: str = "train", cache=True):
        if split not in _SPLIT_OFFSETS:
            raise ValueError(f"Glyphs: split must be one of {sorted(_SPLIT_OFFSETS)}, got {split!r}")
        for name, value in (("num_classes", num_classes), ("examples_per_class", examples_per_class),
                            ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Glyphs: {name} must be a positive integer, got {value!r}")
        offset = _SPLIT_OFFSETS[split]

        def draw():
            return np.concatenate([_class_images(seed, offset + c, examples_per_class, image_size)
                                   for c in range(num_classes)])[:, None]

        name = f"glyphs-{split}-seed{seed}-{num_classes}x{examples_per_class}-{image_size}px"
        folder = None if cache is False else (default_cache_folder() if cache is True else Path(cache).expanduser())
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                folder = None
        images = cached_array(folder / name if folder is not None else None, f"{name}:rendering{_RENDERING}", draw)
        targets = torch.arange(num_classes).repeat_interleave(examples_per_class)
        super().__init__(torch.from_numpy(images), targets, [f"glyph{offset + c}" for c in range(num_classes)],
                         self.default_transform(image_size))
        self.split, self.seed = split, seed


class GlyphsSource(DataSource):
    """Glyphs as a run's data set: ``glyph_classes`` training characters, 50 for validation and
    100 for testing, all drawn offline."""

    name = "glyphs"
    summary = "synthetic Omniglot-like characters, generated offline (the default)"
    options = (Option("glyph_classes", int, "Glyphs: training characters (default 200)", positive=True),)
    needs_root = False
    ignores = {"root": "Glyphs are drawn, not read", "download": "Glyphs are drawn, not read",
               "train_split": "Glyphs have their own train/val/test characters",
               "val_split": "Glyphs have their own train/val/test characters",
               "test_split": "Glyphs have their own train/val/test characters",
               "frame": "Glyphs are drawn centred, at one size"}

    @classmethod
    def default_transform(cls, config):
        return Glyphs.default_transform(config.data.image_size)

    @classmethod
    def build_sets(cls, config):
        classes = config.data.options.get("glyph_classes") or 200
        return tuple(Glyphs(num_classes=n, image_size=config.data.image_size, seed=config.training.seed, split=s)
                     for s, n in (("train", classes), ("val", 50), ("test", 100)))
