"""fastadapt: fast, verifiably correct gradient-based meta-learning on PyTorch."""

from . import algorithms, config, data, models
from .algorithms import ANIL, MAML, FirstOrderMAML, MAMLPlusPlus, MetaLearner, MetaOutput, MetaSGD, ProtoNet, Reptile
from .config import AlgorithmConfig, DataConfig, ModelConfig, RunConfig, TrainingConfig
from .data import Sinusoid, TaskBatch
from .evaluate import evaluate
from .predict import Prediction, Predictor, PredictorEnsemble
from .train import Trainer
from .version import __version__

__all__ = ["MAML", "FirstOrderMAML", "MAMLPlusPlus", "MetaSGD", "ANIL", "Reptile", "ProtoNet", "MetaLearner",
           "MetaOutput", "Sinusoid", "TaskBatch", "Trainer", "evaluate", "Predictor", "PredictorEnsemble", "Prediction", "RunConfig",
           "DataConfig", "ModelConfig", "AlgorithmConfig", "TrainingConfig", "algorithms", "config", "data", "models",
           "__version__"]
