"""``pattern="channels"``: whole neurons, channels and attention heads, with the layers they couple.

The families come from :mod:`lightning_prune.models.graph`. A structure is pruned when all its weights in
the targets are masked. Zero consumer columns alone already make its output irrelevant, so the
masked model computes what the smaller model of :func:`lightning_prune.surgery.shrink.shrink` computes.
Training-time freezing, checkpoints and DDP are the unstructured masks' own machinery; selection
picks structures instead of weights (:meth:`Channels.select`), and layer-wise OBS removes a
structure's consumer columns ``Q`` with the group update ``dW = -W[:, Q] ([H^-1]_QQ)^-1 (H^-1)[Q, :]``
(:mod:`lightning_prune.solvers.structured`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_prune.engine.selection import Shards, floor_count, select_masks
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.models import hf_config as hf
from lightning_prune.models.graph import Family, Slot, discover, tiles
from lightning_prune.patterns.base import Pattern, register
from lightning_prune.runtime.distributed import warn


def _view(t: PruneTarget, x: Tensor, slot: Slot, size: int) -> Tensor:
    """``(size, ...)`` view of ``x`` (weight layout) with structure ``j`` in row ``j``."""
    return slot.view(t.matrix(x), size)


class Channels(Pattern):
    """``pattern="channels"``: prune whole structures (see the module docstring).

    ``target`` is the fraction of *structures* removed (of all families under ``scope="global"``,
    of each family under ``"layer"``); ``min_density`` keeps at least ``max(1, ceil(min_density *
    size))`` structures of every family, so no layer loses all of them. A structure's score is the
    sum of its weights' scores: magnitude ranks by the group's L1 norm (as "Pruning Filters" does,
    over the producer rows and the consumer columns), OBD by the summed ``1/2 h w^2``.
    """

    name = "channels"
    removes_structures = True

    def __init__(self) -> None:
        self.families: list[Family] = []
        self.notes: list[str] = []
        self._targets: dict[str, PruneTarget] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channels)

    def __hash__(self) -> int:
        return hash(self.name)

    def check_scope(self, scope: str) -> None:
        if scope == "row":
            raise ValueError(
                "pattern='channels' removes whole rows and columns: use scope='global' or 'layer', got scope='row'"
            )

    # ------------------------------------------------------------------ binding
    def bind(
        self, model: nn.Module, targets: Sequence[PruneTarget], target: float, scope: str, min_density: float
    ) -> Channels:
        """Discover the families of ``model`` among ``targets``; refuse if none or the target is unreachable."""
        families, notes = discover(model)
        by_module = {t.module_name: t for t in targets if t.is_layer_weight}
        kept = []
        for f in families:
            if missing := [s.module for s in f.consumers if s.module not in by_module]:
                notes.append(f"{f.name}: consumer {missing} is not a pruning target, left alone")
                continue
            slots = [s for s in (*f.producers, *f.consumers) if s.module in by_module]
            dims = {(s.module, s.axis): _dim(by_module[s.module], s.axis) for s in slots}
            layers = dict.fromkeys(s.module for s in slots)
            if bad := [m for m in layers if not tiles([s for s in slots if s.module == m], f.size, dims)]:
                notes.append(f"{f.name}: the shapes of {bad} do not split into {f.size} structures, left alone")
                continue
            kept.append(f)
        if not kept:
            raise ValueError(
                f"pattern='channels' found no structure to remove in {type(model).__name__} among the targets: "
                + ("; ".join(notes[:6]) or "no Linear/Conv chain, gated MLP or attention block")
                + ". Supported: nn.Sequential chains, Hugging Face MLPs and attention "
                "(see lightning_prune.models.graph)"
            )
        covered = {s.module for f in kept for s in (*f.producers, *f.consumers)}
        if alone := [t.name for t in targets if t.module_name not in covered]:
            notes.append(f"targets in no family stay dense: {alone[:8]}{' ...' if len(alone) > 8 else ''}")
        bound = Channels()
        bound.families, bound.notes = kept, notes
        bound._targets = {
            s.module: by_module[s.module] for f in kept for s in (*f.producers, *f.consumers) if s.module in by_module
        }
        bound._check_feasible(target, scope, min_density)
        bound._check_checkpoint(model, families, target, scope)
        return bound

    def _check_checkpoint(self, model: nn.Module, families: Sequence[Family], target: float, scope: str) -> None:
        """On a Hugging Face model, say at the start (not after the pruning) when the shrunk model will not
        be a standard checkpoint: blocks that lose different numbers of structures, or sizes the config
        class refuses. ``families``: all the model's, the bound ones among them."""
        if not hf.pretrained_models(model):
            return
        if scope != "layer":
            warn(
                f"pattern='channels' with scope={scope!r} on a Hugging Face model removes different numbers of heads "
                "and neurons in different blocks: no standard config describes the shrunk model, so "
                "Shrunk.save_pretrained will refuse it (with_plan=True writes it for lightning_prune.load_shrunk). "
                "Leave scope unset (or 'layer') to remove the same number in every block"
            )
            return
        if problem := self._checkpoint_problem(model, families, target):
            hint = hf.target_hint(model, families, self.families)
            warn(
                f"pattern='channels' at target={target}: {problem}. The shrunk model will not save as a standard "
                f"Hugging Face checkpoint (Shrunk.save_pretrained refuses it): choose another target ({hint}), "
                "or leave the heads whole (include=['*mlp*'] prunes MLP neurons only)"
            )

    def _checkpoint_problem(self, model: nn.Module, families: Sequence[Family], target: float) -> str | None:
        kept = {f.name: f.size - round(target * f.size) for f in self.families}
        return hf.predicted_problem(model, families, kept)

    def _check_feasible(self, target: float, scope: str, min_density: float) -> None:
        sizes = {f.name: f.size for f in self.families}
        if scope == "layer":
            for name, n in sizes.items():
                if round(target * n) > n - floor_count(n, min_density):
                    raise ValueError(
                        f"target={target} with pattern='channels', scope='layer' would leave {name!r} ({n} structures) "
                        f"fewer than the floor of {floor_count(n, min_density)} (min_density={min_density})"
                    )
            return
        total = sum(sizes.values())
        floor = sum(floor_count(n, min_density) for n in sizes.values())
        if round(target * total) > total - floor:
            raise ValueError(
                f"target={target} is unreachable under pattern='channels': the floor (min_density={min_density}) keeps "
                f"{floor} of {total} structures, so at most {(total - floor) / total:.4f} can go"
            )

    def slots(self, family: Family, which: str = "all") -> list[tuple[Slot, PruneTarget]]:
        """``(slot, target)`` of a family's layers that are targets (``which``: all, producers, consumers)."""
        chosen = (
            family.producers
            if which == "producers"
            else family.consumers
            if which == "consumers"
            else (*family.producers, *family.consumers)
        )
        return [(s, self._targets[s.module]) for s in chosen if s.module in self._targets]

    # ------------------------------------------------------------------ structures <-> masks
    def pruned(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per family, which structures are pruned (every weight of theirs in the targets masked)."""
        out = {}
        for f in self.families:
            gone = torch.ones(f.size, dtype=torch.bool, device=next(iter(masks.values())).device)
            for s, t in self.slots(f):
                gone &= ~_view(t, masks[t.name], s, f.size).any(1).to(gone.device)
            out[f.name] = gone
        return out

    def units(self, masks: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
        return {n: (int(p.sum()), p.numel()) for n, p in self.pruned(masks).items()}

    def check_sharded(self, layers: Sequence[PruneTarget], scope: str) -> None:
        raise ValueError(
            "pattern='channels' couples the rows of one layer with the columns of the next, which FSDP2 shards on "
            "different ranks: it is not supported on sharded models yet (use it without sharding, or an "
            "unstructured or N:M pattern)"
        )

    def structures(self, masks: Mapping[str, Tensor]) -> tuple[int, int] | None:
        units = self.units(masks).values()
        return (sum(p for p, _ in units), sum(n for _, n in units)) if self.families else None

    def check_masks(self, masks: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None, what: str) -> None:
        """Masks must be what whole structures give: masks only shrink, so unstructured or N:M masks can
        never become structures."""
        weights = dict(masks)
        expected = self.expand({n: torch.ones_like(m) for n, m in weights.items()}, self.pruned(weights))
        if bad := [n for n, m in weights.items() if not torch.equal(m, expected[n])]:
            raise ValueError(
                f"{what} masks of {bad[:5]} prune parts of structures (or weights in none), not whole neurons, "
                "channels or heads: pattern='channels' removes whole structures, and masks only shrink. Start from "
                "the dense model (or masks pruned with pattern='channels')"
            )

    def scores(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per family, each structure's summed weight score (float64)."""
        out = {}
        for f in self.families:
            total = torch.zeros(f.size, dtype=torch.float64, device=next(iter(scores.values())).device)
            for s, t in self.slots(f):
                total += _view(t, scores[t.name].detach().to(torch.float64), s, f.size).sum(1).to(total.device)
            out[f.name] = total
        return out

    def expand(self, masks: Mapping[str, Tensor], gone: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``masks`` with every weight of the ``gone`` structures (per family) masked."""
        out = {n: m.clone() for n, m in masks.items()}
        for f in self.families:
            if f.name not in gone:
                continue
            for s, t in self.slots(f):
                m = t.matrix(out[t.name])
                s.clear(m, f.size, gone[f.name].to(m.device))
        return out

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
        """Weight masks (weight layout) removing ``sparsity`` of the structures with the lowest summed scores."""
        unit_scores = self.scores(scores)
        kept = {n: ~p for n, p in self.pruned(masks).items()}
        chosen = select_masks(unit_scores, kept, sparsity, scope=scope, min_density=min_density)
        return self.expand(masks, {n: ~c for n, c in chosen.items()})


def _dim(t: PruneTarget, axis: str) -> int:
    d_out, d_in = t.shape2d
    return d_out if axis == "out" else d_in


@register("'channels'")
def _parse(spec: str) -> Pattern | None:
    return Channels() if spec == "channels" else None
