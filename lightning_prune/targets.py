"""Which parameters get pruned.

By default: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (subclasses included).
Never biases, norm layers or embeddings unless the user names them explicitly through
``parameters=[...]``. Targets are resolved at ``on_fit_start``, i.e. after ``configure_model`` has
built the layers and after the strategy moved them to their device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import Tensor, nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PruneTarget:
    """One prunable parameter and the module that owns it."""

    name: str  # parameter name in ``LightningModule.named_parameters()``
    module_name: str
    module: nn.Module
    param_name: str  # attribute name on ``module`` (``"weight"`` by default)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def is_layer_weight(self) -> bool:
        """True for the weight of a Linear/Conv layer: the only kind curvature hooks understand."""
        return self.param_name == "weight" and isinstance(self.module, PRUNABLE_TYPES)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_patterns(arg: str, patterns: Sequence[str] | None) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{arg}` must be a list of glob patterns (e.g. ['encoder.*']), got {patterns!r}")


def resolve_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    parameters: Sequence[Tensor] | None = None,
) -> list[PruneTarget]:
    """Pick the parameters to prune, in ``named_parameters()`` order.

    ``include``/``exclude`` are glob patterns (``fnmatch``, case-sensitive) over parameter names
    such as ``"encoder.layers.*.weight"``. ``parameters`` is an explicit list of parameter objects
    of ``model``: it replaces the default Linear/Conv filter, and the patterns still apply.
    """
    _check_patterns("include", include)
    _check_patterns("exclude", exclude)
    owner: dict[str, tuple[str, nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owner.setdefault(full, (module_name, module, param_name))

    named = dict(model.named_parameters())
    if parameters is not None:
        by_id = {id(p): n for n, p in named.items()}
        candidates = []
        for i, p in enumerate(parameters):
            if id(p) not in by_id:
                raise ValueError(
                    f"`parameters[{i}]` (shape {tuple(p.shape)}) is not a parameter of {type(model).__name__}"
                )
            candidates.append(by_id[id(p)])
    else:
        candidates = [n for n in named if owner[n][2] == "weight" and isinstance(owner[n][1], PRUNABLE_TYPES)]

    chosen = [
        n for n in candidates if (include is None or _matches(n, include)) and not (exclude and _matches(n, exclude))
    ]
    if not chosen:
        shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"No parameters to prune in {type(model).__name__}: include={include!r}, exclude={exclude!r} "
            f"matched none of the candidates [{shown or 'no Linear/Conv weights found'}]"
        )
    return [PruneTarget(n, owner[n][0], owner[n][1], owner[n][2]) for n in chosen]
