"""The pattern protocol: what a sparsity pattern decides, and the registry that parses ``pattern=``.

A pattern constrains the masks a round may choose; the criterion's scores still decide *which*
weights go. Everything pattern-specific is behind these methods, so selection, criteria, the
pruner and the callbacks never test a pattern's type, and a new pattern is one module in this
package that registers a parser (:func:`register`); the package imports every module in it.

Masks passed to and returned by a pattern are in each weight's own layout, keyed by layer name;
``layers`` (the bound :class:`~lightning_prune.engine.targets.PruneTarget` s) give the ``(d_out, d_in)``
view where a pattern needs rows and columns. Without ``layers`` the masks are that view already.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_prune.engine.selection import Shards, check_feasible, select_masks
from lightning_prune.engine.targets import PruneTarget

_PARSERS: list[tuple[str, Callable[[str], Pattern | None]]] = []


def register(form: str) -> Callable[[Callable[[str], Pattern | None]], Callable[[str], Pattern | None]]:
    """Register a parser of ``pattern=`` strings; ``form`` is how the error message lists it (``""``: not
    listed, for a string that is recognised only to say where it is handled instead)."""

    def deco(parser: Callable[[str], Pattern | None]) -> Callable[[str], Pattern | None]:
        _PARSERS.append((form, parser))
        return parser

    return deco


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """A ``pattern=`` argument (a registered string form, or a :class:`Pattern`) -> a :class:`Pattern`."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        for _, parser in _PARSERS:
            if (found := parser(pattern)) is not None:
                return found
    forms = [form for form, _ in _PARSERS if form]
    listed = ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else "".join(forms)
    raise ValueError(f"`pattern` must be {listed}, got {pattern!r}")


def as_matrices(tensors: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None) -> dict[str, Tensor]:
    """Weight-layout tensors as ``(d_out, d_in)`` matrices (unchanged without ``layers``)."""
    if layers is None:
        return dict(tensors)
    by_name = {t.name: t for t in layers}
    return {n: by_name[n].matrix(x) for n, x in tensors.items()}


def from_matrices(tensors: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None) -> dict[str, Tensor]:
    """The inverse of :func:`as_matrices`."""
    if layers is None:
        return dict(tensors)
    by_name = {t.name: t for t in layers}
    return {n: by_name[n].unmatrix(x) for n, x in tensors.items()}


class Pattern:
    """Any weight may be pruned (the unstructured pattern); the base every pattern refines."""

    name = "unstructured"
    # whole structures (neurons, channels, heads) go: layer-wise OBS removes them with the structured
    # solver, and lightning_prune.shrink deletes them
    removes_structures = False
    # masks are chosen within each output row (N:M groups): a weight stored transposed and sharded
    # by its inputs (GPT-2's Conv1D under FSDP2) cannot be
    within_rows = False
    notes: Sequence[str] = ()  # what a bound pattern leaves alone, said when it binds

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ construction (the pruner's arguments)
    def check_target(self, target: float) -> None:
        """Refuse a final sparsity the pattern cannot have."""

    def check_min_density(self, min_density: float) -> None:
        """Refuse a per-layer floor the pattern can never meet."""

    def check_scope(self, scope: str) -> None:
        """Refuse a scope the pattern cannot select under."""

    # ------------------------------------------------------------------ binding to a model
    def bind(
        self, model: nn.Module, layers: Sequence[PruneTarget], target: float, scope: str, min_density: float
    ) -> Pattern:
        """The pattern for this model (a structured one discovers what it removes); refuses layers it does
        not fit and a target the floor makes unreachable."""
        self.check_layers(layers)
        check_feasible({t.name: t.param.numel() for t in layers}, target, scope, min_density)
        return self

    def check_layers(self, layers: Sequence[PruneTarget]) -> None:
        """Refuse layers whose shape the pattern does not fit."""

    def check_sharded(self, layers: Sequence[PruneTarget], scope: str) -> None:
        """Refuse what cannot be chosen on FSDP2-sharded layers (each rank holds a block of rows)."""
        transposed = [t.name for t in layers if t.sharded and t.transposed]
        if transposed and (scope == "row" or self.within_rows):
            raise ValueError(
                f"scope={scope!r} / pattern={str(self)!r} choose within output rows, and FSDP2 shards "
                f"{transposed[:3]} (Conv1D, stored inputs x outputs) across their inputs: use scope='global' or "
                "'layer' with an unstructured pattern for these layers"
            )

    # ------------------------------------------------------------------ counting
    def units(self, masks: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
        """``(pruned, total)`` units per layer, what ``target`` is a fraction of: weights here."""
        return {n: (int((~m).sum()), m.numel()) for n, m in masks.items()}

    def structures(self, masks: Mapping[str, Tensor]) -> tuple[int, int] | None:
        """``(pruned, total)`` structures, for a pattern that removes them; ``None`` otherwise."""
        return None

    def check_masks(self, masks: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None, what: str) -> None:
        """Refuse masks that break the pattern (from a checkpoint or an earlier round): masks only shrink,
        so a pattern cannot be recovered from them."""

    # ------------------------------------------------------------------ choosing
    def select(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        sparsity: float,
        *,
        scope: str = "global",
        min_density: float | None = 0.0,
        shards: Shards | None = None,
        layers: Sequence[PruneTarget] | None = None,
    ) -> dict[str, Tensor]:
        """New masks reaching ``sparsity`` from ``scores`` (see :mod:`lightning_prune.engine.selection`);
        ``scope="row"`` compares within each output row of the ``(d_out, d_in)`` view."""
        if scope != "row":
            return select_masks(scores, masks, sparsity, scope=scope, min_density=min_density, shards=shards)
        out = select_masks(
            as_matrices(scores, layers), as_matrices(masks, layers), sparsity, scope="row", min_density=min_density
        )
        return from_matrices(out, layers)

    def quotas(self, layer: PruneTarget, pruned: Tensor) -> tuple[int, Tensor] | None:
        """For solvers that choose masks inside their column sweep: ``(M, pruned per group of M)`` from the
        allocated ``pruned`` mask (weight layout); ``None``: the solver picks freely within each row."""
        return None
