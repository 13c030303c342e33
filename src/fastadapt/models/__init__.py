"""Plain ``nn.Module`` networks used by the meta-learners.

Nothing here knows about meta-learning: every algorithm runs these modules functionally through
``torch.func.functional_call``, so any ordinary module works the same way.
"""

from .conv import conv4
from .learner import Learner, miniimagenet_config, omniglot_config
from .mlp import mlp

__all__ = ["conv4", "mlp", "Learner", "omniglot_config", "miniimagenet_config"]
