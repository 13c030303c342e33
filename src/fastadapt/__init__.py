"""fastadapt: fast, verifiably correct gradient-based meta-learning on PyTorch."""

from . import algorithms, data, models
from .algorithms import ANIL, MAML, MetaLearner, MetaOutput, MetaSGD, ProtoNet, Reptile
from .data import Sinusoid, TaskBatch
from .evaluate import evaluate
from .predict import Prediction, Predictor
from .train import Trainer

__version__ = "0.1.0"

__all__ = ["MAML", "MetaSGD", "ANIL", "Reptile", "ProtoNet", "MetaLearner", "MetaOutput", "Sinusoid", "TaskBatch",
           "Trainer", "evaluate", "Predictor", "Prediction", "algorithms", "data", "models", "__version__"]
