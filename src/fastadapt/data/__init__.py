"""Episodic few-shot data. Nothing here imports a model or an algorithm.

Every module of this package is imported here, so a data set in a new file registers its
``DataSource`` (``source.sources()``) without being listed anywhere.
"""

import importlib
import pkgutil

from .augment import RandomAffine, StrokeStyle
from .episodes import ClassBatch, TaskBatch
from .folder import ImageFolder
from .glyphs import Glyphs
from .imageset import ImageSet
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot, alphabets_of, maml_protocol
from .sampler import ClassBatchSampler, EpisodeSampler
from .sinusoid import Sinusoid
from .source import DataSource, source, sources
from .transform import ImageTransform

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TaskBatch", "ClassBatch", "ClassBatchSampler", "Sinusoid", "ImageSet", "EpisodeSampler", "Omniglot", "alphabets_of", "maml_protocol",
           "MiniImageNet", "ImageFolder", "Glyphs", "ImageTransform", "RandomAffine", "StrokeStyle", "DataSource", "source",
           "sources"]
