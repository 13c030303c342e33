"""Episodic few-shot data. Nothing here imports a model or an algorithm."""

from .episodes import TaskBatch
from .sinusoid import Sinusoid

__all__ = ["TaskBatch", "Sinusoid"]
