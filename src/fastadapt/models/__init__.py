"""Plain ``nn.Module`` networks used by the meta-learners.

Nothing here knows about meta-learning: every algorithm runs these modules functionally through
``torch.func.functional_call``, so any ordinary module works the same way.
"""

from .conv import NORMS, TaskNorm2d, conv4
from .learner import Learner, load_network_config, miniimagenet_config, omniglot_config, reference_init_
from .mlp import mlp
from .resnet import RESNET12_WIDTHS, ResNet12, resnet12

__all__ = ["conv4", "TaskNorm2d", "NORMS", "mlp", "Learner", "omniglot_config", "miniimagenet_config", "reference_init_",
           "load_network_config",
           "resnet12", "ResNet12", "RESNET12_WIDTHS"]
