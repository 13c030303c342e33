"""Meta-learning algorithms: each is an inner loop over one task, on the shared vectorised engine."""

from .base import MetaLearner, MetaOutput, batch_statistics
from .maml import MAML

__all__ = ["MetaLearner", "MetaOutput", "MAML", "batch_statistics"]
