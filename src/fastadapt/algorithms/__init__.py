"""Meta-learning algorithms: each is an inner loop over one task, on the shared vectorised engine."""

from .base import MetaLearner, MetaOutput, batch_statistics
from .anil import ANIL
from .maml import MAML
from .metasgd import MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["MetaLearner", "MetaOutput", "MAML", "MetaSGD", "ANIL", "Reptile", "ProtoNet", "batch_statistics"]
