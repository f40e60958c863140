"""Structured pruning (``pattern="channels"``): whole neurons, channels and attention heads.

A *structure* is one unit of a layer's output that can disappear from the model: a hidden neuron,
a Conv output channel, an attention head (with grouped-query attention: a key/value head together
with the query heads that share it). Removing it touches several layers at once, a **family**:

* **producers**: the layers whose output rows it is (a Linear's row and bias, a Conv's filter; a
  per-channel BatchNorm between them goes too);
* **consumers**: the layers that read it, as columns of their ``(d_out, d_in)`` matrix (a
  Conv's ``kh * kw`` unfolded columns, a Linear's ``H * W`` columns after a ``Flatten``, a head's
  ``head_dim`` columns of ``o_proj``).

A structure is pruned when all its weights in the targets are masked. Zero consumer columns alone
already make its output irrelevant, so the masked model computes what the smaller model of
:func:`lightning_prune.shrink.shrink` computes. Training-time freezing, checkpoints and DDP are the
unstructured masks' own machinery; selection picks structures instead of weights
(:meth:`Channels.select`), and layer-wise OBS removes a structure's consumer columns ``Q`` with the
group update ``dW = -W[:, Q] ([H^-1]_QQ)^-1 (H^-1)[Q, :]`` (:mod:`lightning_prune.obs.structured`).

**Discovery** is a small graph of our own, not Torch-Pruning's DepGraph (measured in
``benchmarks/RESULTS.md``: DepGraph groups Sequential MLPs and CNNs in 0.05 s, but did not finish
tracing a one-layer LLaMA of transformers 5 in 5 minutes, and its groups carry no notion of the
consumer columns OBS compensates in). It understands:

* ``nn.Sequential`` chains (not overriding ``forward``): Linear/Conv -> element-wise activations,
  dropout, per-channel BatchNorm, pooling, ``Flatten`` -> Linear/Conv;
* Hugging Face blocks, by their layers' names: gated MLPs (``gate_proj``/``up_proj`` rows,
  ``down_proj`` columns: LLaMA, Mistral, Qwen), GPT-2's MLP (``c_fc``/``c_proj``), BERT's
  intermediate (``intermediate.dense``/``output.dense``), and attention with ``q_proj``/``k_proj``/
  ``v_proj``/``o_proj`` and a ``head_dim`` (heads; under grouped-query attention each structure is
  a key/value head with its ``num_key_value_groups`` query heads, so the ratio the model relies on
  is kept).

Everything else (residual streams, LayerNorm'd features, grouped convolutions, the classifier's
outputs, a layer used twice) is left alone and listed in :attr:`Channels.notes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_prune.patterns import Pattern
from lightning_prune.selection import floor_count, select_masks
from lightning_prune.targets import PruneTarget, is_hf_conv1d

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Slot:
    """Where structure ``j`` lives in one layer: block ``j`` of ``width`` rows (``axis="out"``)
    or columns (``"in"``) of the layer's ``(d_out, d_in)`` weight matrix."""

    module: str
    axis: str
    width: int


@dataclass(frozen=True)
class Family:
    """Interchangeable structures: removing any of them touches the same layers."""

    name: str
    kind: str  # "neurons", "channels" or "heads"
    size: int
    producers: tuple[Slot, ...]
    consumers: tuple[Slot, ...]
    norms: tuple[str, ...] = ()  # per-channel BatchNorms between producer and consumer


def _in_width(consumer: nn.Module, channels: int, flattened: bool) -> int | None:
    """Columns of ``consumer``'s matrix per input channel, or ``None`` if they do not line up."""
    if isinstance(consumer, nn.Linear):
        d_in = consumer.in_features
        if flattened and d_in % channels == 0:
            return d_in // channels  # Flatten of (C, *spatial): channel-major blocks
        return 1 if d_in == channels else None
    if isinstance(consumer, _CONVS) and not flattened:
        if consumer.groups != 1 or consumer.in_channels != channels:
            return None
        return int(consumer.weight[0, 0].numel())
    return None


def _out_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels if module.groups == 1 else None
    return None


def _plain(module: nn.Module) -> bool:
    """A Sequential whose forward is ``nn.Sequential``'s: its children run one after another."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flat_children(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if _plain(child):
            out += _flat_children(child, full)
        else:
            out.append((full, child))
    return out


def _sequential_families(model: nn.Module, notes: list[str]) -> list[Family]:
    families = []
    for seq_name, seq in model.named_modules():
        if not _plain(seq) or _nested_in(model, seq_name):
            continue  # a nested plain Sequential is walked with its parent
        items = _flat_children(seq, seq_name)
        for i, (p_name, producer) in enumerate(items):
            size = _out_size(producer)
            if size is None:
                if isinstance(producer, _CONVS):
                    notes.append(f"{p_name}: grouped convolution, left alone")
                continue
            norms, flattened, why = [], False, None
            for c_name, module in items[i + 1 :]:
                if isinstance(module, _ELEMENTWISE):
                    continue
                if isinstance(module, _POOLS) and isinstance(producer, _CONVS):
                    continue
                if isinstance(module, _NORMS) and module.num_features == size:
                    norms.append(c_name)
                    continue
                if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
                    flattened = True
                    continue
                width = _in_width(module, size, flattened and isinstance(producer, _CONVS))
                if width is None:
                    why = f"its output reaches {c_name} ({type(module).__name__}), which the grouping does not follow"
                    break
                kind = "channels" if isinstance(producer, _CONVS) else "neurons"
                families.append(
                    Family(p_name, kind, size, (Slot(p_name, "out", 1),), (Slot(c_name, "in", width),), tuple(norms))
                )
                break
            else:
                why = "its output leaves the Sequential (the model's output, or a consumer the grouping cannot see)"
            if why:
                notes.append(f"{p_name}: outputs kept, {why}")
    return families


def _nested_in(model: nn.Module, name: str) -> list[str]:
    """Names of plain-``Sequential`` ancestors of module ``name`` (it is walked as part of them)."""
    parts = name.split(".") if name else []
    out = []
    for k in range(len(parts)):
        anc = ".".join(parts[:k])
        module = model.get_submodule(anc) if anc else model
        if _plain(module):
            out.append(anc)
    return out


def _linear(module: nn.Module, attr: str) -> nn.Module | None:
    child = getattr(module, attr, None)
    return child if isinstance(child, nn.Linear) else None


def _hf_families(model: nn.Module, notes: list[str]) -> list[Family]:
    families = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        gate, up, down = (_linear(mod, a) for a in ("gate_proj", "up_proj", "down_proj"))
        if gate is not None and up is not None and down is not None:
            size = down.in_features
            if gate.out_features == up.out_features == size:
                families.append(
                    Family(
                        name,
                        "neurons",
                        size,
                        (Slot(f"{prefix}gate_proj", "out", 1), Slot(f"{prefix}up_proj", "out", 1)),
                        (Slot(f"{prefix}down_proj", "in", 1),),
                    )
                )
            continue
        fc, proj = getattr(mod, "c_fc", None), getattr(mod, "c_proj", None)
        if fc is not None and proj is not None and is_hf_conv1d(fc) and is_hf_conv1d(proj):
            if fc.nf == proj.weight.shape[0]:  # Conv1D weight is in x out
                families.append(
                    Family(
                        name, "neurons", fc.nf, (Slot(f"{prefix}c_fc", "out", 1),), (Slot(f"{prefix}c_proj", "in", 1),)
                    )
                )
            continue
        inter, output = getattr(mod, "intermediate", None), getattr(mod, "output", None)
        i_dense, o_dense = (
            _linear(inter, "dense") if inter is not None else None,
            (_linear(output, "dense") if output is not None else None),
        )
        if i_dense is not None and o_dense is not None and i_dense.out_features == o_dense.in_features:
            families.append(
                Family(
                    name,
                    "neurons",
                    i_dense.out_features,
                    (Slot(f"{prefix}intermediate.dense", "out", 1),),
                    (Slot(f"{prefix}output.dense", "in", 1),),
                )
            )
            continue
        q, k, v, o = (_linear(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if q is not None and k is not None and v is not None and o is not None:
            head_dim = getattr(mod, "head_dim", None)
            rep = getattr(mod, "num_key_value_groups", 1)
            ok = isinstance(head_dim, int) and isinstance(rep, int) and head_dim > 0 and rep > 0
            kv = k.out_features // head_dim if ok else 0
            if (
                ok
                and k.out_features == v.out_features == kv * head_dim
                and q.out_features == o.in_features == kv * rep * head_dim
            ):
                families.append(
                    Family(
                        name,
                        "heads",
                        kv,
                        (
                            Slot(f"{prefix}q_proj", "out", rep * head_dim),
                            Slot(f"{prefix}k_proj", "out", head_dim),
                            Slot(f"{prefix}v_proj", "out", head_dim),
                        ),
                        (Slot(f"{prefix}o_proj", "in", rep * head_dim),),
                    )
                )
            else:
                notes.append(f"{name}: attention whose head layout (head_dim, num_key_value_groups) is not readable")
            continue
        if getattr(mod, "c_attn", None) is not None or all(
            _linear(mod, a) is not None for a in ("query", "key", "value")
        ):
            notes.append(f"{name}: attention heads of this layout (fused c_attn, or query/key/value) are left alone")
    return families


def discover(model: nn.Module) -> tuple[list[Family], list[str]]:
    """The model's families, and notes on what was left alone (see the module docstring)."""
    notes: list[str] = []
    families = _sequential_families(model, notes) + _hf_families(model, notes)
    # a module used in several places has consumers the grouping cannot see
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    seen: set[str] = set()
    out = []
    for f in families:
        names = [s.module for s in (*f.producers, *f.consumers)]
        shared = [n for n in names if uses[id(model.get_submodule(n))] > 1]
        if shared:
            notes.append(f"{f.name}: {shared} are held by several modules, left alone")
        elif any(s.module in seen for s in f.producers):
            notes.append(f"{f.name}: its producers already belong to another family, left alone")
        else:
            seen.update(s.module for s in f.producers)
            out.append(f)
    return out, notes


def _view(t: PruneTarget, x: Tensor, slot: Slot, size: int) -> Tensor:
    """``(size, ...)`` view of ``x`` (weight layout) with structure ``j`` in row ``j``."""
    return _view_matrix(t.matrix(x), slot, size)


def _view_matrix(m: Tensor, slot: Slot, size: int) -> Tensor:
    """``(size, ...)`` view of ``m`` (``(d_out, d_in)`` layout) with structure ``j`` in row ``j``."""
    if slot.axis == "out":
        return m.reshape(size, slot.width * m.shape[1])
    return m.reshape(m.shape[0], size, slot.width).transpose(0, 1).reshape(size, -1)


class Channels(Pattern):
    """``pattern="channels"``: prune whole structures (see the module docstring).

    ``target`` is the fraction of *structures* removed (of all families under ``scope="global"``,
    of each family under ``"layer"``); ``min_density`` keeps at least ``max(1, ceil(min_density *
    size))`` structures of every family, so no layer loses all of them. A structure's score is the
    sum of its weights' scores: magnitude ranks by the group's L1 norm (as "Pruning Filters" does,
    over the producer rows and the consumer columns), OBD by the summed ``1/2 h w^2``.
    """

    name = "channels"

    def __init__(self) -> None:
        self.families: list[Family] = []
        self.notes: list[str] = []
        self._targets: dict[str, PruneTarget] = {}

    @property
    def structured(self) -> bool:
        return True

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
            bad = [
                s.module
                for s in (*f.producers, *f.consumers)
                if s.module in by_module and not _fits(by_module[s.module], s, f.size)
            ]
            if bad:
                notes.append(f"{f.name}: the shapes of {bad} do not split into {f.size} structures, left alone")
                continue
            kept.append(f)
        if not kept:
            raise ValueError(
                f"pattern='channels' found no structure to remove in {type(model).__name__} among the targets: "
                + ("; ".join(notes[:6]) or "no Linear/Conv chain, gated MLP or attention block")
                + ". Supported: nn.Sequential chains, Hugging Face MLPs and attention (see lightning_prune.structures)"
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
        return bound

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

    def check_masks(self, masks: Mapping[str, Tensor], what: str) -> None:
        """Masks (``(d_out, d_in)`` layout) must be what whole structures give: masks only shrink, so
        unstructured or N:M masks can never become structures."""
        by_name = {t.name: t for t in self._targets.values()}
        weights = {n: by_name[n].unmatrix(m) if n in by_name else m for n, m in masks.items()}
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
                g = gone[f.name].to(m.device)
                if s.axis == "out":
                    m.view(f.size, s.width, m.shape[1])[g] = False
                else:
                    m.view(m.shape[0], f.size, s.width)[:, g] = False
        return out

    def select(
        self, scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], sparsity: float, scope: str, min_density: float
    ) -> dict[str, Tensor]:
        """Weight masks (weight layout) removing ``sparsity`` of the structures with the lowest summed scores."""
        unit_scores = self.scores(scores)
        kept = {n: ~p for n, p in self.pruned(masks).items()}
        chosen = select_masks(unit_scores, kept, sparsity, scope=scope, min_density=min_density)
        return self.expand(masks, {n: ~c for n, c in chosen.items()})


def _fits(t: PruneTarget, slot: Slot, size: int) -> bool:
    d_out, d_in = t.shape2d
    return (d_out if slot.axis == "out" else d_in) == size * slot.width


def structure_sparsity(pattern: Pattern, masks: Mapping[str, Tensor]) -> tuple[int, int] | None:
    """``(pruned, total)`` structures under a bound :class:`Channels` pattern, else ``None``."""
    if not isinstance(pattern, Channels) or not pattern.families:
        return None
    units = pattern.units(masks).values()
    return sum(p for p, _ in units), sum(n for _, n in units)
