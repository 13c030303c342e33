"""Compatibility with code written for other meta-learning libraries.

``fastadapt.compat`` (the same as ``fastadapt.compat.maml_pytorch``) runs scripts written against
the MAML-Pytorch reference code unchanged: ``Learner(config, imgc, imgsz)``, ``Meta(args, config)``.
"""

from .maml_pytorch import Learner, Meta

__all__ = ["Learner", "Meta"]
