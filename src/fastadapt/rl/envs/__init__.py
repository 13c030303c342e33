"""Task families for meta-RL, by name: ``navigation-2d`` (tensors), ``halfcheetah-dir`` and
``halfcheetah-vel`` (gymnasium's HalfCheetah-v5; ``fastadapt[rl]``), and ``GymTaskFamily`` for a
family of your own."""

from .base import TaskFamily, families, family
from .gym import GymTaskFamily, HalfCheetahDirection, HalfCheetahVelocity
from .navigation import Navigation2D

__all__ = ["TaskFamily", "families", "family", "GymTaskFamily", "HalfCheetahDirection", "HalfCheetahVelocity",
           "Navigation2D"]
