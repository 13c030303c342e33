"""A user's own images: ``root/<class>/<image>``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from .imageset import ImageSet, load_images
from .source import DataSource
from .transform import ImageTransform, image_files, polarity, sub_folder_notice


class ImageFolder(ImageSet):
    """Every sub-folder of ``root`` is a class, every file directly in it an image (any format
    Pillow reads); deeper folders are not read, with a warning naming them.

    Images are converted to ``channels`` (1: grey, 3: RGB), resized to ``image_size`` squared and,
    with ``invert=True``, inverted (``255 - pixel``). A file whose suffix is not an image format's
    (``notes.txt``, ``Thumbs.db``) is skipped with a warning naming it. A file that cannot be
    decoded raises a ``ValueError`` naming it (``on_error="raise"``, the default) or is skipped
    with a warning naming it (``on_error="skip"``); it is never given a label. A class folder with
    no usable image is an error. ``strict_channels=True`` makes an image of another channel count
    (colour in a grey set, or the reverse) an error too. ``frame``: drawings cropped to their ink
    and centred (``ImageTransform.frame``).
    """

    def __init__(self, root, image_size: int = 28, channels: int = 1, on_error: str = "raise",
                 strict_channels: bool = False, invert: bool = False, frame: Optional[float] = None):
        root = Path(root).expanduser()
        if channels not in (1, 3):
            raise ValueError(f"ImageFolder: channels must be 1 or 3, got {channels!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {root} is not a folder")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"ImageFolder: {root} has no class sub-folders (expected root/<class>/<image>)")
        files, labels = [], []
        for label, name in enumerate(classes):
            members, others, sub_folders = image_files(root / name)
            for other in others:
                warnings.warn(f"skipping {other}: not an image file", stacklevel=2)
            if not members:
                layout = (f"; {sub_folder_notice(sub_folders)} (the layout is root/<class>/<image>, "
                          f"one level deep)" if sub_folders else "")
                raise ValueError(f"ImageFolder: class folder {root / name} holds no image files{layout}")
            if sub_folders:
                warnings.warn(f"ImageFolder: class folder {root / name}: {sub_folder_notice(sub_folders)}; "
                              f"only the images directly in it are", stacklevel=2)
            files += members
            labels += [label] * len(members)
        transform = ImageTransform(image_size, channels, invert=invert, convert_channels=not strict_channels,
                                   frame=frame)
        images, kept = load_images([(str(p), p.read_bytes) for p in files], transform, on_error, strict_channels)
        targets = torch.tensor([labels[i] for i in kept], dtype=torch.long)
        counts = torch.bincount(targets, minlength=len(classes))
        empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
        if empty:
            raise ValueError(f"ImageFolder: class folder {root / empty[0]} has no readable image")
        images = torch.from_numpy(images)
        transform = transform.replace(background=polarity(images))
        self.files = [files[i] for i in kept]
        super().__init__(images, targets, classes, transform, [str(p) for p in self.files])
        self.root = root


class FolderSource(DataSource):
    """A user's own images as a run's data set: ``root/train``, ``root/val`` and, when present,
    ``root/test`` (else the validation folder is the test set too), each ``<class>/<images>``."""

    name = "folder"
    summary = "your own images: --root DIR with DIR/train/<class>/..., DIR/val/<class>/... (and DIR/test)"
    channels = 3
    fixed_channels = False

    @classmethod
    def test_is_validation(cls, config) -> bool:
        return not (Path(config.data.root) / "test").is_dir()

    @classmethod
    def build_sets(cls, config):
        d = config.data
        if cls.test_is_validation(config):
            warnings.warn(f"{Path(d.root) / 'test'} does not exist: the test tasks come from {Path(d.root) / 'val'} "
                          "(other episodes of the same classes), so best.pt is tested on the classes it was "
                          "selected on", stacklevel=3)
        root = Path(d.root)
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        return tuple(ImageFolder(folder, image_size=d.image_size, channels=d.channels, frame=d.frame)
                     for folder in (root / "train", root / "val", test_dir))
