"""Meta-reinforcement learning: MAML-RL on batched task environments.

A sibling of ``data``/``algorithms``: it uses the algorithms' inner-loop rules, the models'
conventions and the Trainer's run folders, and nothing below it imports it.
"""

from . import envs, returns
from .envs import GymTaskFamily, TaskFamily, families, family
from .maml_trpo import MAMLTRPO, RLOutput, conjugate_gradient
from .policies import CategoricalMLPPolicy, GaussianMLPPolicy, PolicyGradientLoss
from .sampling import Trajectories, policy_outputs, sample

__all__ = ["envs", "returns", "GymTaskFamily", "TaskFamily", "families", "family", "MAMLTRPO", "RLOutput",
           "conjugate_gradient", "CategoricalMLPPolicy", "GaussianMLPPolicy", "PolicyGradientLoss", "Trajectories",
           "policy_outputs", "sample"]
