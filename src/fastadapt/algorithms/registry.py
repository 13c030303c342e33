"""Algorithms by name: what ``--algo`` offers, which options each accepts, and which class a
configuration builds.

A ``MetaLearner`` subclass that sets ``name`` is registered when its class is defined. A class
may also declare ``extends = ("maml", ...)``: it then adds its options to those algorithms, and a
configuration of one of them that sets any of its options builds the extending class instead
(``--algo maml --lslr`` is MAML with MAML++'s learned rates). This module imports nothing else.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> None:
    """Register ``cls`` under ``cls.name``; a name is taken once (a class redefined under the same
    qualified name, as a re-run notebook cell does, replaces the old one)."""
    name = cls.__dict__.get("name")
    if name is None:
        return
    taken = _REGISTRY.get(name)
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"algorithm name {name!r} is taken by {taken.__qualname__}")
    _REGISTRY[name] = cls


def registered() -> Dict[str, type]:
    """Every registered algorithm class, by name (the ``--algo`` choices)."""
    return dict(_REGISTRY)


def extensions_of(name: str) -> List[type]:
    """The registered classes that declare ``extends`` with ``name``."""
    return [cls for cls in _REGISTRY.values() if name in getattr(cls, "extends", ())]


def accepted_options(cls: type) -> Tuple:
    """The options a configuration of ``cls`` may set: its own, then its extensions' (each once)."""
    options, seen = [], set()
    for owner in [cls, *extensions_of(getattr(cls, "name", None) or "")]:
        for option in owner.options:
            if option.name not in seen:
                seen.add(option.name)
                options.append(option)
    return tuple(options)


def build(model, config):
    """The learner that ``config.algorithm`` describes, on ``model``: the named class's
    ``from_config``, or an extension's ``from_base_config`` when one of its options is set."""
    cls = _REGISTRY[config.algorithm.name]
    options = config.algorithm.options
    learner = None
    for extension in extensions_of(config.algorithm.name):
        if any(options.get(option.name) for option in extension.options):
            learner = extension.from_base_config(model, config, base=cls)
            break
    learner = learner if learner is not None else cls.from_config(model, config)
    if hasattr(learner, "query_statistics"):
        learner.query_statistics = config.algorithm.query_statistics
    return learner
