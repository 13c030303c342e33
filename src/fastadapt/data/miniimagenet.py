"""miniImageNet (Vinyals et al. 2016) with the Ravi and Larochelle (2017) class split."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .imageset import ImageSet, cache_location, cached_array, load_images
from .source import DataSource
from .transform import ImageTransform

SPLITS = ("train", "val", "test")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a cache file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data cache")


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.LANCZOS))
                     for im in images])


class MiniImageNet(ImageSet):
    """One split (``train``, ``val`` or ``test``) of miniImageNet.

    Reads either ``root/mini-imagenet-cache-{split}.pkl`` (a dict with ``image_data`` ``[N, 84, 84, 3]``
    uint8 and ``class_dict`` label -> indices) or ``root/images/*.jpg`` with ``root/{split}.csv``
    (``filename,label`` rows). Images are resized to ``image_size`` once and cached as ``.npy``
    (``cache`` as in ``Omniglot``: True next to the data, a folder, or False).
    """

    @staticmethod
    def default_transform(image_size: int = 84) -> ImageTransform:
        """Colour photographs resized with Lanczos, values in [0, 1], no normalisation."""
        return ImageTransform(image_size, channels=3, resample="lanczos")

    def __init__(self, root, split: str = "train", image_size: int = 84, cache=True):
        if split not in SPLITS:
            raise ValueError(f"MiniImageNet: split must be one of {SPLITS}, got {split!r}")
        root = Path(root).expanduser()
        pkl, table = root / f"mini-imagenet-cache-{split}.pkl", root / f"{split}.csv"
        if pkl.is_file():
            images, targets, names = self._from_pickle(pkl, image_size)
            sources = None
        elif table.is_file():
            images, targets, names, sources = self._from_csv(root, table, image_size, cache)
        else:
            raise FileNotFoundError(f"MiniImageNet split {split!r}: neither {pkl} nor {table} (with {root / 'images'}/) "
                                    "exists; see docs for the expected layouts")
        super().__init__(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                         torch.tensor(targets), names, self.default_transform(image_size), sources)
        self.split, self.root = split, root

    @staticmethod
    def _from_pickle(path, image_size):
        try:
            with open(path, "rb") as handle:
                data = _ArrayUnpickler(handle).load()
            images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
        except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as error:
            raise ValueError(f"{path}: not a miniImageNet cache ({error})") from error
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{path}: image_data must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        names = sorted(class_dict)
        targets = np.full(len(images), -1, dtype=np.int64)
        for label, name in enumerate(names):
            targets[np.asarray(class_dict[name], dtype=np.int64)] = label
        keep = targets >= 0
        return _resize_all(images[keep], image_size), targets[keep], names

    @staticmethod
    def _from_csv(root, table, image_size, cache):
        with open(table, newline="") as handle:
            rows = list(csv.reader(handle))
        if rows and rows[0][:2] == ["filename", "label"]:
            rows = rows[1:]
        bad = [i for i, r in enumerate(rows) if len(r) != 2]
        if bad:
            raise ValueError(f"{table}: line {bad[0] + 2} is not 'filename,label'")
        names = sorted({label for _, label in rows})
        index = {name: i for i, name in enumerate(names)}
        missing = [f for f, _ in rows if not (root / "images" / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{table}: {len(missing)} listed image(s) missing from {root / 'images'}, "
                                    f"e.g. {missing[0]}")

        def build():
            items = [(str(root / "images" / f), (root / "images" / f).read_bytes) for f, _ in rows]
            array, _ = load_images(items, MiniImageNet.default_transform(image_size))
            return array.transpose(0, 2, 3, 1)

        cache_path = cache_location(cache, root, f"miniimagenet_{table.stem}_{image_size}px")
        images = cached_array(cache_path, f"{table}:{table.stat().st_mtime}:{len(rows)}", build)
        sources = [str(root / "images" / f) for f, _ in rows]
        return images, np.array([index[label] for _, label in rows], dtype=np.int64), names, sources


class MiniImageNetSource(DataSource):
    """miniImageNet as a run's data set (Ravi and Larochelle's 64/16/20-class splits)."""

    name = "miniimagenet"
    summary = "miniImageNet: --root with images/ and train/val/test.csv, or the pickle caches"
    image_size = 84
    channels = 3
    ignores = {"frame": "photographs have no ink on paper to frame"}

    @classmethod
    def default_transform(cls, config):
        return MiniImageNet.default_transform(config.data.image_size)

    @classmethod
    def build_sets(cls, config):
        return tuple(MiniImageNet(config.data.root, s, image_size=config.data.image_size)
                     for s in ("train", "val", "test"))
