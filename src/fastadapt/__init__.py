"""fastadapt: fast, verifiably correct gradient-based meta-learning on PyTorch."""

from . import algorithms, data, models
from .algorithms import MAML, MetaLearner, MetaOutput
from .data import Sinusoid, TaskBatch
from .evaluate import evaluate
from .train import Trainer

__version__ = "0.1.0"

__all__ = ["MAML", "MetaLearner", "MetaOutput", "Sinusoid", "TaskBatch", "Trainer", "evaluate", "algorithms",
           "data", "models", "__version__"]
