"""Episodic few-shot data. Nothing here imports a model or an algorithm."""

from .augment import RandomAffine
from .episodes import TaskBatch
from .folder import ImageFolder
from .glyphs import Glyphs
from .imageset import ImageSet
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot, alphabets_of, maml_protocol
from .sampler import EpisodeSampler
from .sinusoid import Sinusoid
from .transform import ImageTransform

__all__ = ["TaskBatch", "Sinusoid", "ImageSet", "EpisodeSampler", "Omniglot", "alphabets_of", "maml_protocol",
           "MiniImageNet", "ImageFolder", "Glyphs", "ImageTransform", "RandomAffine"]
