"""Class-indexed image sets: every image loaded once into one uint8 tensor."""

from __future__ import annotations

import collections
import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .transform import ImageTransform


class ImageSet:
    """Images of several classes held in memory.

    ``images``: uint8 ``[N, C, H, W]``; ``targets``: int64 ``[N]`` class indices into
    ``class_names``. Samplers only need these and ``indices_of``. ``transform``, where the set
    was read from files, is the ``ImageTransform`` that made ``images`` from them (and turns them
    into network input); ``sources`` names each image's file where known.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                 transform: Optional[ImageTransform] = None, sources: Optional[Sequence[str]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be [N] = [{images.shape[0]}], got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.to(torch.int64)
        self.class_names = list(class_names)
        if sources is not None and len(sources) != images.shape[0]:
            raise ValueError(f"sources must name the {images.shape[0]} images, got {len(sources)} names")
        self.transform = transform
        self.sources = list(sources) if sources is not None else None
        order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(self.targets, minlength=len(self.class_names))
        self._class_indices = list(torch.split(order, counts.tolist()))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def indices_of(self, cls) -> torch.Tensor:
        """Indices of the images of class ``cls`` (an index or a name)."""
        if isinstance(cls, str):
            cls = self.class_names.index(cls)
        return self._class_indices[cls]

    @property
    def alphabets(self) -> Optional[List[str]]:
        """The alphabet of each class where class names are ``alphabet/character`` (Omniglot's,
        also after rotation or the MAML protocol's pooling), else None."""
        if not self.class_names or not all("/" in name for name in self.class_names):
            return None
        return [name.split("/")[0] for name in self.class_names]

    def class_sizes(self) -> torch.Tensor:
        return torch.tensor([len(i) for i in self._class_indices])

    def subset(self, classes: Iterable[int]) -> "ImageSet":
        """A new set with only ``classes`` (relabelled 0..k-1 in the given order)."""
        classes = list(classes)
        index = torch.cat([self._class_indices[c] for c in classes]) if classes else torch.zeros(0, dtype=torch.long)
        relabel = torch.full((self.num_classes,), -1, dtype=torch.long)
        relabel[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
        sources = None if self.sources is None else [self.sources[i] for i in index.tolist()]
        return ImageSet(self.images[index], relabel[self.targets[index]], [self.class_names[c] for c in classes],
                        self.transform, sources)

    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Network input from some of ``images``: the transform's, or ``uint8 / 255``."""
        if self.transform is not None:
            return self.transform.to_tensor(images)
        return images.float().div_(255)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_classes} classes, {len(self)} images of "
                f"{tuple(self.images.shape[1:])})")


def load_images(items: Sequence[Tuple[str, callable]], transform: ImageTransform,
                on_error: str = "raise", strict_channels: bool = False) -> Tuple[np.ndarray, List[int]]:
    """Decode ``(source, read_bytes)`` pairs with ``transform``; returns the stacked uint8 images
    and the positions kept (with ``on_error="skip"`` an undecodable file is left out, with a
    warning naming it)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    arrays, kept = [], []
    for position, (source, read) in enumerate(items):
        try:
            arrays.append(transform.decode(read(), source, strict_channels))
            kept.append(position)
        except ValueError as error:
            if on_error == "raise":
                raise
            warnings.warn(f"skipping {error}", stacklevel=2)
    empty = np.zeros((0, transform.channels, transform.image_size, transform.image_size), np.uint8)
    return (np.stack(arrays) if arrays else empty), kept


_RECENT: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
_RECENT_KEPT = 6


def remembered_array(key: tuple, build) -> np.ndarray:
    """A copy of ``build()``'s array, which is remembered for the process under ``key`` (which must
    identify the content: file, size, modification time, options). The last few data sets decoded
    are kept, so evaluating right after training, or several runs in one notebook or test session,
    decode a data set once (Omniglot's minimal set: 0.6 s a split)."""
    if key in _RECENT:
        _RECENT.move_to_end(key)
    else:
        _RECENT[key] = build()
        while len(_RECENT) > _RECENT_KEPT:
            _RECENT.popitem(last=False)
    return _RECENT[key].copy()


def cache_location(cache, data_root: Path, name: str) -> Optional[Path]:
    """Where a decoded-image cache goes: ``True`` beside the data, a folder, or ``False`` for none."""
    if cache is False or cache is None:
        return None
    folder = data_root if cache is True else Path(cache).expanduser()
    return folder / name


def cached_array(cache_path: Optional[Path], fingerprint: str, build) -> np.ndarray:
    """Load ``build()``'s array from ``cache_path`` when its fingerprint matches, else build and save.

    The cache is an ``.npy`` file written atomically; an unwritable location is not an error
    (the data may sit on a read-only share), it just means no cache.
    """
    if cache_path is None:
        return build()
    tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    path = cache_path.with_name(f"{cache_path.name}.{tag}.npy")
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass
    array = build()
    try:
        temporary = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(temporary, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(temporary, path)
    except OSError:
        try:
            temporary.unlink()
        except (OSError, UnboundLocalError):
            pass
    return array
