"""Meta-learning algorithms: each is an inner loop over one task, on the shared vectorised engine.

Every module of this package is imported here, so an algorithm in a new file registers itself
(``registry.registered()``) without being listed anywhere.
"""

import importlib
import pkgutil

from . import forward, functional, registry
from .engine import MetaLearner, MetaOutput
from .registry import registered
from .anil import ANIL
from .maml import MAML, FirstOrderMAML
from .mamlpp import MAMLPlusPlus
from .metasgd import MetaSGD
from .pretrain import Pretrain
from .protonet import ProtoNet
from .reptile import Reptile

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def batch_statistics(model):
    """Run ``model``'s BatchNorm layers with each batch's statistics, touching no running statistics
    (the engine's default policy), for a plain forward pass outside the engine."""
    return forward.applied(model, forward.ForwardPolicy(matmul_convolutions=False))


__all__ = ["MetaLearner", "MetaOutput", "MAML", "FirstOrderMAML", "MAMLPlusPlus", "MetaSGD", "ANIL", "Reptile",
           "ProtoNet", "Pretrain", "batch_statistics", "registered", "forward", "functional", "registry"]
