"""Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015), from its official zips or folders."""

from __future__ import annotations

import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import Option
from .download import download as fetch
from .download import extract_zip
from .imageset import ImageSet, cache_location, cached_array, load_images, remembered_array
from .sampler import EpisodeSampler
from .source import DataSource, first_tasks
from .transform import ImageTransform

SPLITS = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "background_small1": "images_background_small1",
    "background_small2": "images_background_small2",
}

_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
# SHA-256 of the minimal sets as distributed; for the full sets, the MD5 sums that torchvision
# publishes for the same files.
CHECKSUMS = {
    "images_background": "md5:68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "md5:6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "sha256:f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2": "sha256:3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}


def _list_source(root: Path, base: str):
    """The (class name, source, reader) triples of one split, from its folder or its zip."""
    folder, archive = root / base, root / f"{base}.zip"
    entries = []
    if folder.is_dir():
        for path in sorted(folder.glob("*/*/*.png")):
            alphabet, character = path.parent.parent.name, path.parent.name
            entries.append((f"{alphabet}/{character}", str(path), path.read_bytes))
        fingerprint = f"{folder}:{len(entries)}:{max((p.stat().st_mtime for p in folder.glob('*/*/*.png')), default=0)}"
        return entries, fingerprint
    if archive.is_file():
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{archive} is not a readable zip file ({error}): a download cut off, or another file "
                             f"under that name; delete it and download it again, or unpack it into {folder}/") from None

        def read(name):
            try:
                return zf.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise ValueError(f"{archive}: {name} cannot be read ({error}); the zip is damaged: delete it and "
                                 "download it again") from None

        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[0] == base and parts[3].endswith(".png"):
                entries.append((f"{parts[1]}/{parts[2]}", f"{archive}:{name}", lambda n=name: read(n)))
        stat = archive.stat()
        return entries, f"{archive}:{stat.st_size}:{stat.st_mtime}"
    return None, None


def alphabets_of(root, split: str) -> list:
    """The alphabet names of an Omniglot split, read from its file names (nothing is decoded).
    The splits are cut from one collection, so an alphabet name found in two splits is the same
    characters drawn by the same people: ``background_small1`` and ``background_small2`` share
    Greek and Latin, and both are inside ``background``."""
    if split not in SPLITS:
        raise ValueError(f"Omniglot: split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root).expanduser()
    entries, _ = _list_source(root, SPLITS[split])
    if entries is None:
        raise FileNotFoundError(f"Omniglot split {split!r}: neither {root / SPLITS[split]}/ nor "
                                f"{root / (SPLITS[split] + '.zip')} exists")
    return sorted({name.split("/")[0] for name, _, _ in entries})


def _drawer_of(source: str) -> int:
    """The drawer number in an Omniglot file name (``0394_07.png`` -> 7), or -1."""
    stem = source.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _rotate(images: torch.Tensor, targets: torch.Tensor, names: Sequence[str], sources=None):
    """Add 90/180/270-degree rotated copies of every class as new classes."""
    all_images, all_targets, all_names = [images], [targets], list(names)
    all_sources = None if sources is None else list(sources)
    for k in (1, 2, 3):
        all_images.append(torch.rot90(images, k, dims=(2, 3)))
        all_targets.append(targets + k * len(names))
        all_names += [f"{n}/rot{90 * k}" for n in names]
        if all_sources is not None:
            all_sources += [f"{s} (rotated {90 * k} degrees)" for s in sources]
    return torch.cat(all_images), torch.cat(all_targets), all_names, all_sources


class Omniglot(ImageSet):
    """One Omniglot split as a class-indexed image set; a class is one character.

    ``root`` holds the official zips (``images_background.zip`` ...) or their unzipped folders.
    ``split``: ``background``, ``evaluation``, ``background_small1`` or ``background_small2``.
    Images are resized to ``image_size`` (Lanczos) and inverted, so strokes are bright on a zero
    background (``default_transform``, stored in checkpoints so ``predict`` reads files the same
    way); ``sources`` names each image's file (``zip:member`` or path), ``drawers`` each image's
    drawer (from its file name). ``alphabets`` keeps only the named alphabets, and
    ``exclude_alphabets`` drops those named (``left_out`` lists the ones this split had: the
    alphabets a model trained on, to test it on unseen ones; see ``alphabets_of``); ``rotations=True``
    adds rotated copies of each character as new classes (the MAML paper's augmentation).
    ``frame`` (a fraction) crops each drawing to its ink, centred, its longer side that fraction
    of the image (``ImageTransform.frame``), so a drawer's size and placement do not reach the
    network. The decoded images are cached
    as ``.npy`` if asked: ``cache=True`` next to the data (when that folder is writable), a path
    puts the cache in that folder; off by default (decoding the full set takes seconds).
    """

    @staticmethod
    def default_transform(image_size: int = 28, frame: Optional[float] = None) -> ImageTransform:
        """The files are black strokes on white; the network sees them inverted."""
        return ImageTransform(image_size, channels=1, resample="lanczos", invert=True, background="dark",
                              frame=frame)

    def __init__(self, root, split: str = "background", image_size: int = 28, rotations: bool = False,
                 download: bool = False, alphabets: Optional[Iterable[str]] = None, cache=False,
                 exclude_alphabets: Iterable[str] = (), frame: Optional[float] = None):
        if split not in SPLITS:
            raise ValueError(f"Omniglot: split must be one of {sorted(SPLITS)}, got {split!r}")
        root = Path(root).expanduser()
        base = SPLITS[split]
        entries, fingerprint = _list_source(root, base)
        if entries is None and download:
            archive = fetch(_URL.format(base), root / f"{base}.zip", CHECKSUMS[base])
            extract_zip(archive, root)
            entries, fingerprint = _list_source(root, base)
        if entries is None:
            raise FileNotFoundError(
                f"Omniglot split {split!r}: neither {root / base}/ nor {root / (base + '.zip')} exists. "
                f"Download {_URL.format(base)} into {root}, or pass download=True (--download on the command line).")
        if not entries:
            raise ValueError(f"Omniglot split {split!r}: no <alphabet>/<character>/*.png images under {root}")
        class_names = sorted({name for name, _, _ in entries})
        if alphabets is not None:
            wanted = set(alphabets)
            known = {name.split("/")[0] for name in class_names}
            missing = wanted - known
            if missing:
                raise ValueError(f"Omniglot split {split!r} has no alphabet(s) {sorted(missing)}; "
                                 f"it has {sorted(known)}")
            class_names = [n for n in class_names if n.split("/")[0] in wanted]
            entries = [e for e in entries if e[0].split("/")[0] in wanted]
        present, excluded = sorted({name.split("/")[0] for name in class_names}), set(exclude_alphabets)
        self.left_out = [name for name in present if name in excluded]
        if self.left_out:
            if len(self.left_out) == len(present):
                raise ValueError(f"Omniglot split {split!r}: every alphabet it has ({', '.join(present)}) is "
                                 "excluded (seen in training); evaluate on another split or name other alphabets")
            class_names = [n for n in class_names if n.split("/")[0] not in self.left_out]
            entries = [e for e in entries if e[0].split("/")[0] not in self.left_out]
        index = {name: i for i, name in enumerate(class_names)}

        transform = self.default_transform(image_size, frame)

        def build():
            return load_images([(source, read) for _, source, read in entries], transform)[0]

        framing = "" if frame is None else f"_frame{transform.frame:g}"
        cache_path = cache_location(cache, root, f"{base}_{image_size}px{framing}")
        key = (f"{fingerprint}:{sorted(alphabets or [])}" + (f":without:{self.left_out}" if self.left_out else "")
               + framing)
        images = torch.from_numpy(remembered_array(("omniglot", key, image_size, str(cache_path)),
                                                   lambda: cached_array(cache_path, key, build)))
        targets = torch.tensor([index[name] for name, _, _ in entries])
        sources = [source for _, source, _ in entries]
        if rotations:
            images, targets, class_names, sources = _rotate(images, targets, class_names, sources)
        super().__init__(images, targets, class_names, transform, sources)
        self.split, self.root = split, root
        # the drawer of each image (its file is <character id>_<drawer>.png), for Lake's runs
        drawers = torch.tensor([_drawer_of(source) for _, source, _ in entries])
        self.drawers = drawers.repeat(4) if rotations else drawers


def maml_protocol(root, train_classes: int = 1200, val_classes: int = 0, seed: int = 0,
                  image_size: int = 28, rotations: bool = True, download: bool = False,
                  splits: Sequence[str] = ("background", "evaluation"),
                  frame: Optional[float] = None) -> Tuple[ImageSet, ImageSet, ImageSet]:
    """The MAML paper's Omniglot protocol: pool all characters of ``splits`` (1623 for the full
    data set), shuffle them with ``seed``, and take ``train_classes`` for meta-training (of which the
    last ``val_classes`` are carved out for validation) and the rest for testing. Characters present
    in several splits (Greek and Latin in both minimal sets) count once. Rotations, when on, are
    added within each part, so a character and its rotations never straddle two parts.

    Returns ``(train, val, test)``; ``val`` is empty (0 classes) when ``val_classes=0``.
    """
    parts = [Omniglot(root, s, image_size=image_size, download=download, frame=frame) for s in splits]
    names, images, targets, sources = [], [], [], []
    seen = set()
    for part in parts:
        for c, name in enumerate(part.class_names):
            if name in seen:
                continue
            seen.add(name)
            idx = part.indices_of(c)
            images.append(part.images[idx])
            sources += [part.sources[i] for i in idx.tolist()]
            targets.append(torch.full((len(idx),), len(names)))
            names.append(name)
    if not 0 <= val_classes <= train_classes < len(names):
        raise ValueError(f"maml_protocol: need 0 <= val_classes ({val_classes}) <= train_classes "
                         f"({train_classes}) < number of characters ({len(names)})")
    pool = ImageSet(torch.cat(images), torch.cat(targets), names, parts[0].transform, sources)
    order = np.random.default_rng(seed).permutation(len(names)).tolist()
    train_ids = order[:train_classes - val_classes]
    val_ids = order[train_classes - val_classes:train_classes]
    test_ids = order[train_classes:]

    def part(ids):
        subset = pool.subset(ids)
        if rotations and ids:
            images, targets, names, sources = _rotate(subset.images, subset.targets, subset.class_names,
                                                      subset.sources)
            return ImageSet(images, targets, names, subset.transform, sources)
        return subset

    return part(train_ids), part(val_ids), part(test_ids)


# ---------------------------------------------------------------------------- as a run's data set
def _names(value) -> Optional[list]:
    """Alphabet names from a comma-separated option (or a list, from the Python API)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [name for name in value.split(",") if name]
    return list(value)


def _warn_if_seen(trained, named, what: str, train_split: str) -> None:
    """Named evaluation alphabets that the model trained on score its memory, not one-shot learning."""
    seen = sorted(set(named or ()) & set(trained))
    if seen:
        warnings.warn(f"{what} include {', '.join(seen)}, which the run trained on (Omniglot split "
                      f"{train_split!r} has the same characters): their scores measure memory, not one-shot "
                      "learning", stacklevel=4)


class OmniglotSource(DataSource):
    """Omniglot as a run's data set: splits by name, alphabets, rotations, the MAML paper's
    1200/423-character protocol, and Lake et al.'s within-alphabet evaluation protocol."""

    name = "omniglot"
    summary = "Omniglot characters (the official zips or folders under --root)"
    options = (
        Option("train_alphabets", str, "comma-separated Omniglot alphabets to train on (default: all of the split)"),
        Option("val_alphabets", str, "alphabets to validate on (default: those of --val-split not trained on)"),
        Option("test_alphabets", str, "alphabets to test on (default: those of --test-split not trained on)"),
        Option("rotations", bool, "Omniglot: rotated characters as new classes"),
        Option("protocol", str, "Omniglot: 'maml' = the 1200/423 character split of all 1623 characters",
               choices=("maml", "official")),
    )
    protocols = {"lake": "Lake et al.'s within-alphabet 20-way 1-shot runs, support and queries by different "
                         "drawers (Omniglot)"}

    @classmethod
    def default_transform(cls, config):
        return Omniglot.default_transform(config.data.image_size, config.data.frame)

    @classmethod
    def trained_alphabets(cls, config) -> list:
        """The alphabets a run meta-trained on, from its configuration and the training split's file
        names (the MAML protocol pools every alphabet)."""
        d, o = config.data, config.data.options
        if o.get("protocol") == "maml":
            return alphabets_of(d.root, "background") + alphabets_of(d.root, "evaluation")
        return _names(o.get("train_alphabets")) or alphabets_of(d.root, d.train_split or "background")

    @classmethod
    def test_is_validation(cls, config) -> bool:
        d, o = config.data, config.data.options
        return (o.get("protocol") != "maml" and d.test_split in (None, d.val_split or "evaluation")
                and o.get("test_alphabets") in (None, o.get("val_alphabets")))

    @classmethod
    def build_sets(cls, config):
        d, o, size = config.data, config.data.options, config.data.image_size
        if o.get("protocol") == "maml":
            return maml_protocol(d.root, val_classes=100, seed=config.training.seed, image_size=size,
                                 rotations=bool(o.get("rotations")), download=d.download, frame=d.frame)
        train_split = d.train_split or "background"
        val_split = d.val_split or "evaluation"

        def load(split, alphabets, rotations, exclude=()):
            return Omniglot(d.root, split, image_size=size, rotations=rotations, download=d.download,
                            alphabets=_names(alphabets), exclude_alphabets=exclude, frame=d.frame)
        train = load(train_split, o.get("train_alphabets"), bool(o.get("rotations")))
        trained = sorted(set(train.alphabets))
        val_alphabets = o.get("val_alphabets")
        test_split, test_alphabets = d.test_split or val_split, o.get("test_alphabets") or val_alphabets
        val = load(val_split, val_alphabets, False, () if val_alphabets else trained)
        test = load(test_split, test_alphabets, False, () if test_alphabets else trained)
        for part, split, named in (("validation", val_split, val_alphabets), ("test", test_split, test_alphabets)):
            _warn_if_seen(trained, _names(named), f"the {part} alphabets of {split!r}", train_split)
        if cls.test_is_validation(config):
            warnings.warn(f"no test split of its own: the test tasks come from the validation split {val_split!r} "
                          "(other episodes of the same characters), so best.pt is tested on the classes it was "
                          "selected on; name a --test-split (and --test-alphabets) for an unbiased test", stacklevel=3)
        return train, val, test

    LAKE_SEED = 2  # the protocol's own tasks, whatever the run's seed (2: what seed-0 runs always drew)

    @classmethod
    def lake_tasks(cls, config, split: str = "background_small2", alphabets=None, count: int = 600):
        """Lake et al.'s one-shot protocol (Science 2015) on an Omniglot split: 20-way 1-shot, every
        task's 20 characters from one alphabet, its support images by one drawer and its queries
        (one per character) by another; ``count`` fixed tasks, in batches of ``eval_batch``, the
        same for every run (not drawn from its training seed), so runs are compared on one set.

        Only alphabets the run did not train on are used, unless ``alphabets`` names some: the
        minimal sets share Greek and Latin, image for image, and a model trained on
        ``background_small1`` scores its memory on them. Alphabets with fewer than 20 characters
        are skipped. Returns ``(tasks, alphabets tested, alphabets left out as seen in training)``."""
        chosen = _names(alphabets)
        try:
            trained = cls.trained_alphabets(config)
        except FileNotFoundError as error:
            if chosen is None:
                raise FileNotFoundError(f"{error}. The protocol leaves out the alphabets the run trained on, so it "
                                        "reads the training split's names; or name the alphabets to test on "
                                        "(--alphabets)") from None
            trained = []
        _warn_if_seen(trained, chosen, f"the alphabets of {split!r}", config.data.train_split or "background")
        images = Omniglot(config.data.root, split, image_size=config.data.image_size, alphabets=chosen,
                          exclude_alphabets=() if chosen else trained, frame=config.data.frame)
        sizes = Counter(images.alphabets)
        sampler = EpisodeSampler(images, 20, 1, 1, min(config.data.eval_batch, count), seed=cls.LAKE_SEED,
                                 group_by="alphabet", drawers="disjoint")
        return first_tasks(sampler, count), sorted(a for a, n in sizes.items() if n >= 20), images.left_out

    @classmethod
    def protocol_tasks(cls, config, protocol, split=None, names=None, count: int = 600):
        if protocol != "lake":
            return super().protocol_tasks(config, protocol, split, names, count)
        tasks, tested, left_out = cls.lake_tasks(config, split or "background_small2", names, count)
        lines = ["Lake et al.'s protocol: 20-way 1-shot within one alphabet, support and queries by different drawers",
                 f"alphabets: {', '.join(tested)}" + (f" (left out, seen in training: {', '.join(left_out)})"
                                                      if left_out else "")]
        return tasks, lines
