"""Typed callbacks: ``class OBSPruning(PruningCallback, criterion=OBS)`` is the whole definition.

A criterion declares its options once, in its factory's signature and docstring (types, defaults, order,
the ``Args:`` section). The class statement registers its callback, and :func:`make_typed` gives it
``__init__(self, target, <the criterion's options>, *, <the pruner's options>)`` with that signature (what
LightningCLI / jsonargparse, Hydra's ``instantiate``, ``inspect`` and IDEs read) and a docstring holding
the criterion's ``Args:`` after the class's own summary. The presets find a criterion's callback here
(:func:`callback_for`), so adding a criterion touches its own file and one class statement.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_prune.criteria.base import CriterionFactory, options_doc, options_of
from lightning_prune.engine.pruner import pruner_parameters

TYPED: dict[CriterionFactory, type] = {}  # criterion factory -> its callback, filled by the class statements


def make_typed(cls: type, factory: CriterionFactory) -> None:
    """Give ``cls`` (a ``PruningCallback`` subclass) the constructor, signature and docstring of ``factory``'s
    options, and register it as that criterion's callback."""
    options = options_of(factory)
    names = [p.name for p in options]

    def __init__(self: Any, target: float, *args: Any, **kwargs: Any) -> None:
        who = type(self).__name__
        if len(args) > len(names):
            raise TypeError(f"{who}() takes at most {len(names) + 1} positional arguments ({len(args) + 1} given)")
        own = dict(zip(names, args))
        if twice := [k for k in own if k in kwargs]:
            raise TypeError(f"{who}() got multiple values for argument {twice[0]!r}")
        own.update({k: kwargs.pop(k) for k in names if k in kwargs})
        super(cls, self).__init__(factory(**own), target, **kwargs)  # type: ignore[misc]

    __init__.__qualname__, __init__.__module__ = f"{cls.__qualname__}.__init__", cls.__module__
    head = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("self", "target")]
    head[1] = head[1].replace(annotation=float)
    __init__.__signature__ = inspect.Signature([*head, *options, *pruner_parameters()])  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    summary, _, rest = inspect.cleandoc(cls.__doc__ or "").partition("\n\n")
    cls.__doc__ = "\n\n".join(part for part in (summary, options_doc(factory), rest) if part)
    cls.criterion_factory = factory  # type: ignore[attr-defined]
    TYPED[factory] = cls
