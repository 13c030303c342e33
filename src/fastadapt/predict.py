"""Use a meta-trained model: adapt it to a few labelled images of new classes, then classify more.

``Predictor.load`` reads a checkpoint's weights, its configuration and the ``ImageTransform``
its training data was read with, so a user's files become exactly the tensors the network was
trained on (Omniglot's black-on-white PNGs are inverted, as its loader inverts them). ``adapt``
takes the support set once; ``predict`` can then be called any number of times.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import experiment
from .data.augment import view_augmentation
from .data.transform import ImageTransform, image_files, polarity, sub_folder_notice

SupportSet = Union[str, Path, Mapping[str, Sequence], torch.Tensor]


@dataclass
class Prediction:
    """Predictions for ``N`` images: ``labels`` ``[N]`` index ``class_names``; ``probabilities``
    ``[N, classes]`` (softmax of the model's output); ``sources`` names the images; ``mode`` is
    the predictor's BatchNorm mode (``Predictor.mode``)."""

    labels: torch.Tensor
    probabilities: torch.Tensor
    class_names: List[str]
    sources: List[str]
    mode: str = "batch"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> List[str]:
        """The predicted class name of each image."""
        return [self.class_names[i] for i in self.labels.tolist()]

    def top_k(self, k: int) -> List[List[tuple]]:
        """The ``k`` most probable ``(class name, probability)`` pairs of each image."""
        values, indices = self.probabilities.topk(min(k, self.probabilities.shape[1]), dim=1)
        return [[(self.class_names[i], float(p)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(indices.tolist(), values.tolist())]


class Predictor:
    """A meta-trained learner with its preprocessing, adapted to one support set at a time.

    BatchNorm: a model trained under batch statistics (the MAML paper's transductive setting) has
    no statistics of its own to classify an image with. By default (``query_statistics="support"``)
    every query is normalised with the statistics of the support set under the adapted weights,
    so an image is classified the same alone or among others. ``"batch"`` normalises the images of
    one ``predict`` call together, as ``evaluate`` scores the query set of an episode (give it all
    the queries of a task at once). A run trained with per-step BatchNorm (``--algo mamlpp`` or
    ``--per-step-bn``) loaded with ``bn_statistics="running"`` uses its recorded statistics instead.
    ``mode`` says which of these applies.
    """

    QUERY_STATISTICS = ("support", "batch")

    def __init__(self, learner, transform: ImageTransform, n_way: Optional[int], inner_steps: int,
                 device="cpu", query_statistics: str = "support", views: int = 1, view_augment=None):
        if query_statistics not in self.QUERY_STATISTICS:
            raise ValueError(f"query_statistics must be one of {', '.join(self.QUERY_STATISTICS)}, "
                             f"got {query_statistics!r}")
        if not (isinstance(views, int) and not isinstance(views, bool) and views >= 1):
            raise ValueError(f"views must be a positive integer (1: no test-time augmentation), got {views!r}")
        if views > 1 and view_augment is None:
            raise ValueError("views > 1 needs view_augment (e.g. fastadapt.data.RandomAffine())")
        self.views, self.view_augment = views, view_augment
        self.learner, self.transform, self.n_way = learner.eval(), transform, n_way
        self.inner_steps, self.device = inner_steps, torch.device(device)
        self.query_statistics = query_statistics
        self._support_x: Optional[torch.Tensor] = None
        self.dtype = next(learner.parameters()).dtype
        self.class_names: Optional[List[str]] = None
        self._fast = None

    @classmethod
    def load(cls, checkpoint, device=None, inner_steps: Optional[int] = None,
             bn_statistics: Optional[str] = None, invert: Optional[bool] = None, learner=None,
             query_statistics: str = "support", head: Optional[str] = None, views: int = 1) -> "Predictor":
        """A predictor from a checkpoint file or a run folder (its ``best.pt`` when present).

        ``device`` defaults to CUDA when available; ``inner_steps`` to the run's test-time steps;
        ``invert`` overrides the stored polarity (True: files are inverted, ``255 - pixel``);
        ``query_statistics`` is described in the class docstring; ``head`` scores a pretrain run
        with another of its heads; ``views`` > 1 turns on test-time augmentation with copies drawn
        as the run's training augmentation (``RandomAffine`` if it had none), as ``eval --tta``.
        A run of the command line rebuilds its learner from the stored configuration; for a model
        built in Python (``Trainer`` with your own learner) pass that ``learner`` to load into.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        run = experiment.load_run(checkpoint, changes=None if head is None else {"head": head}, device=device,
                                  bn_statistics=bn_statistics, learner=learner)
        path, state, config = run.path, run.state, run.config
        if config.loss != "cross_entropy":
            raise ValueError(f"{path}: a {config.data.dataset} regressor; Predictor classifies images")
        if state.get("transform"):
            transform = ImageTransform.from_dict(state["transform"])
        else:
            transform = experiment.default_transform(config)
            if transform is None:
                raise ValueError(f"{path} stores no preprocessing and its data set ({config.data.dataset}) has none")
            warnings.warn(f"{path} stores no preprocessing (an older checkpoint); reading images as "
                          f"{config.data.dataset} files: {transform.channels} channel(s), {transform.image_size}px, "
                          f"invert={transform.invert}", stacklevel=2)
        if invert is not None:
            transform = transform.replace(invert=bool(invert))
        learner = run.learner
        n_way = learner.output_classes()
        steps = config.algorithm.inner_steps_test if inner_steps is None else inner_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {steps!r}")
        if not getattr(learner, "takes_steps", True):
            steps = 0
        view_augment = None
        if views != 1:
            view_augment = view_augmentation(config.data.augment, config.data.augment_strokes)
        predictor = cls(learner, transform, n_way, steps, device, query_statistics, views, view_augment)
        predictor.checkpoint, predictor.step = path, state.get("step")
        return predictor

    @property
    def mode(self) -> str:
        """How queries are normalised: ``"support"``, ``"batch"``, ``"running"`` (recorded
        per-step statistics) or ``"none"`` (the model has no BatchNorm)."""
        if not any(isinstance(m, _BatchNorm) for m in self.learner.model.modules()):
            return "none"
        if (getattr(self.learner, "bn_statistics", "batch") == "running"
                or self.learner.forward_policy().statistics == "running"):
            return "running"
        return self.query_statistics

    def describe_mode(self) -> str:
        """One line for the user: what a query's class depends on."""
        return {"none": "the model has no BatchNorm: each image is classified on its own",
                "running": "BatchNorm uses the statistics recorded in training: each image is classified on its own",
                "support": "BatchNorm normalises each query with the support set's statistics: each image is "
                           "classified on its own",
                "batch": "BatchNorm normalises the query images of one call together (transductive, as evaluation "
                         "scores episodes): a class depends on the other images given"}[self.mode]

    # ------------------------------------------------------------------ reading images
    @staticmethod
    def _image_files(folder: Path, what: str) -> List[Path]:
        files, others, sub_folders = image_files(folder)
        for other in others:
            warnings.warn(f"skipping {other}: not an image file", stacklevel=3)
        if not files:
            layout = f"; {sub_folder_notice(sub_folders)}" if sub_folders else ""
            raise ValueError(f"{what} {folder} holds no image files{layout}")
        if sub_folders:
            warnings.warn(f"{what} {folder}: {sub_folder_notice(sub_folders)}; only the images directly in it are",
                          stacklevel=3)
        return files

    @staticmethod
    def _query_files(folder: Path) -> List[Path]:
        """The images directly in ``folder`` and in its class sub-folders, one level down: a query
        folder may be laid out like a support folder (held-out images by class), and each output
        row names its file. Deeper folders are not read, with a warning naming them."""
        files, others, sub_folders = image_files(folder)
        deeper = []
        for sub in sub_folders:
            members, sub_others, nested = image_files(sub)
            files, others, deeper = files + members, others + sub_others, deeper + nested
        for other in others:
            warnings.warn(f"skipping {other}: not an image file", stacklevel=3)
        if deeper:
            warnings.warn(f"query folder {folder}: {sub_folder_notice(deeper)}; the images directly in it "
                          f"and in its sub-folders are", stacklevel=3)
        if not files:
            raise ValueError(f"query folder {folder} holds no image files (directly or one sub-folder down)")
        return files

    def _support_from(self, support, labels, class_names):
        """(network input, labels, class names) of a support set in any of its accepted forms."""
        if isinstance(support, torch.Tensor):
            if labels is None:
                raise ValueError("adapt: support given as a tensor needs labels=")
            if support.dim() == 0 or support.shape[0] == 0:
                raise ValueError("adapt: the support tensor holds no images")
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != support.shape[:1]:
                raise ValueError(f"adapt: labels {tuple(labels.shape)} must be [{support.shape[0]}], one per image")
            names = list(class_names) if class_names is not None else [str(i) for i in range(int(labels.max()) + 1)]
            return support.float(), labels, names
        if isinstance(support, (str, Path)):
            root = Path(support)
            if not root.is_dir():
                raise FileNotFoundError(f"support folder {root} does not exist")
            classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise ValueError(f"support folder {root} has no class folders (expected {root}/<class>/<image>)")
            support = {name: self._image_files(root / name, "class folder") for name in classes}
        if not isinstance(support, Mapping):
            raise TypeError("adapt: support must be a folder, a {class name: [images]} mapping, or a tensor")
        if not support:
            raise ValueError("adapt: the support mapping has no classes (expected {class name: [images]})")
        names, images, sources, targets = [], [], [], []
        for label, (name, members) in enumerate(support.items()):
            members = list(members)
            if not members:
                raise ValueError(f"adapt: class {name!r} has no support image")
            names.append(str(name))
            images += members
            sources += [str(m) if isinstance(m, (str, Path)) else f"{name}[{i}]" for i, m in enumerate(members)]
            targets += [label] * len(members)
        stored = self.transform.decode_all(images, sources)
        self._check_polarity(stored)
        return self.transform.to_tensor(stored), torch.tensor(targets), names

    def _check_polarity(self, stored: torch.Tensor) -> None:
        expected, found = self.transform.background, polarity(stored)
        if expected and found and expected != found:
            flag = "--no-invert" if self.transform.invert else "--invert"
            warnings.warn(f"the support images have a {found} background after preprocessing, but the model was "
                          f"trained on images with a {expected} one; if they are drawn the other way round, pass "
                          f"{flag} (Python: invert={not self.transform.invert})", stacklevel=3)

    # ------------------------------------------------------------------ adapting and predicting
    def adapt(self, support: SupportSet, labels=None, class_names: Optional[Sequence[str]] = None) -> "Predictor":
        """Adapt to a support set: a folder of class folders (sorted by name), a mapping
        ``{class name: [paths, bytes or PIL images]}`` (in its order), or a tensor of network
        input ``[S, C, H, W]`` with ``labels``. Classes may have different numbers of images."""
        x, y, names = self._support_from(support, labels, class_names)
        counts = torch.bincount(y, minlength=len(names))
        if (counts == 0).any():
            raise ValueError(f"adapt: class {names[int((counts == 0).nonzero()[0])]!r} has no support image")
        fixed = self.learner.output_classes()
        if fixed is not None and len(names) != fixed:
            raise ValueError(f"the support set has {len(names)} classes, but the model is {fixed}-way "
                             f"(its output layer has {fixed} units)")
        self.learner.use_classes(len(names))
        if self.views > 1:
            x, y = self._with_views(x).flatten(0, 1), y.repeat_interleave(self.views)
        with torch.no_grad():
            self._support_x = x.to(self.device, self.dtype)
            self._fast = self.learner.adapt(self._support_x, y.to(self.device), inner_steps=self.inner_steps)
        self.class_names = names
        return self

    def predict(self, images) -> Prediction:
        """Classify ``images``: a folder, a list of paths / bytes / PIL images, or a tensor of
        network input ``[N, C, H, W]``. Whether they are normalised together is ``mode`` (see the
        class docstring)."""
        if self._fast is None:
            raise RuntimeError("predict: call adapt(support) first")
        if isinstance(images, torch.Tensor):
            x, sources = images.float(), [f"image {i}" for i in range(images.shape[0])]
        else:
            if isinstance(images, (str, Path)):
                folder = Path(images)
                if folder.is_file():
                    images = [folder]
                elif folder.is_dir():
                    images = self._query_files(folder)
                else:
                    raise FileNotFoundError(f"query {folder} does not exist")
            images = list(images)
            sources = [str(m) if isinstance(m, (str, Path)) else f"image {i}" for i, m in enumerate(images)]
            x = self.transform.to_tensor(self.transform.decode_all(images, sources))
        if x.shape[0] == 0:
            raise ValueError("predict: no images given")
        reference = self._support_x if self.mode == "support" else None
        count = x.shape[0]
        if self.mode == "batch" and count == 1:
            warnings.warn(f"{sources[0]}: one image in batch mode is normalised by its own statistics alone, which "
                          "leaves it near chance (docs/predict.md); classify one image with the support set's "
                          "statistics (query_statistics='support', the default)", stacklevel=2)
        if self.views > 1:
            x = self._with_views(x).flatten(0, 1)
        with torch.no_grad():
            logits = self.learner.predict(self._fast, x.to(self.device, self.dtype), reference=reference)
        if self.views > 1:  # each image's views vote with their mean probabilities, as evaluate scores them
            probabilities = logits.float().softmax(-1).view(count, self.views, -1).mean(1).cpu()
            return Prediction(probabilities.argmax(-1), probabilities, list(self.class_names), sources, self.mode)
        labels = logits.argmax(-1).cpu()  # of the logits, as evaluation scores them
        return Prediction(labels, logits.float().softmax(-1).cpu(), list(self.class_names), sources, self.mode)

    def _with_views(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` images as ``[N, views, ...]``: each image, then ``views - 1`` copies drawn by
        ``view_augment`` from a generator seeded by the image's own pixels, so that an image gets
        the same views whether it comes alone or among others."""
        rows = []
        for image in x:
            generator = np.random.default_rng(zlib.crc32(image.detach().cpu().contiguous().numpy().tobytes()))
            copies = self.view_augment(image[None].expand(self.views - 1, *image.shape).contiguous(), generator)
            rows.append(torch.cat([image[None], copies.to(image.dtype)]))
        return torch.stack(rows)


class PredictorEnsemble:
    """Several predictors (other seeds, other learners) adapted to the same support set: each
    image's class probabilities are the mean of theirs, as ``fastadapt eval RUN RUN...`` scores
    an ensemble. Each member reads the files with its own preprocessing, so a support set or
    queries are given as files, folders or PIL images (a tensor would be one member's input).
    With every member in support mode an image is classified the same alone or among others."""

    def __init__(self, predictors: Sequence[Predictor]):
        predictors = list(predictors)
        if not predictors or not all(isinstance(p, Predictor) for p in predictors):
            raise ValueError("PredictorEnsemble needs one or more Predictor objects")
        self.predictors = predictors

    @classmethod
    def load(cls, checkpoints: Sequence, head: Optional[str] = None, **options) -> "PredictorEnsemble":
        """``Predictor.load`` of each checkpoint with the same ``options``; ``head`` is given to the
        pretrain runs among them (the others have no heads), an error when none is one."""
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("PredictorEnsemble.load: no checkpoints given")
        heads = [None] * len(checkpoints) if head is None else experiment.heads_for(checkpoints, head)
        return cls([Predictor.load(c, head=h, **options) for c, h in zip(checkpoints, heads)])

    @property
    def class_names(self) -> Optional[List[str]]:
        return self.predictors[0].class_names

    @property
    def mode(self) -> str:
        """The members' ``mode`` when they share one, else their modes joined by ``+``."""
        modes = list(dict.fromkeys(p.mode for p in self.predictors))
        return "+".join(modes)

    def describe_mode(self) -> str:
        lines = list(dict.fromkeys(p.describe_mode() for p in self.predictors))
        return "; ".join(lines)

    def adapt(self, support: SupportSet, labels=None, class_names: Optional[Sequence[str]] = None):
        """Adapt every member to ``support`` (as ``Predictor.adapt``)."""
        if isinstance(support, torch.Tensor) and len(self.predictors) > 1:
            raise TypeError("PredictorEnsemble.adapt: give the support set as a folder or a {class: [images]} "
                            "mapping; a tensor is one member's network input")
        for predictor in self.predictors:
            try:
                predictor.adapt(support, labels, class_names)
            except ValueError as error:
                raise ValueError(f"{getattr(predictor, 'checkpoint', 'a member')}: {error}") from None
        return self

    def predict(self, images) -> Prediction:
        """The mean of the members' class probabilities for ``images`` (as ``Predictor.predict``)."""
        if isinstance(images, torch.Tensor) and len(self.predictors) > 1:
            raise TypeError("PredictorEnsemble.predict: give the images as files, a folder or PIL images; a tensor "
                            "is one member's network input")
        if not isinstance(images, (str, Path)):
            images = list(images)  # an iterator is read once per member
        predictions = [p.predict(images) for p in self.predictors]
        probabilities = torch.stack([p.probabilities for p in predictions]).mean(0)
        first = predictions[0]
        return Prediction(probabilities.argmax(-1), probabilities, first.class_names, first.sources, self.mode)
