"""The model graph that structured pruning and ``shrink`` share: which layers a structure spans.

A *structure* is one unit of a layer's output that can disappear from the model: a hidden neuron,
a Conv output channel, an attention head (with grouped-query attention: a key/value head together
with the query heads that share it). Removing it touches several layers at once, a **family**:

* **producers**: the layers whose output rows it is (a Linear's row and bias, a Conv's filter; a
  per-channel BatchNorm between them goes too);
* **consumers**: the layers that read it, as columns of their ``(d_out, d_in)`` matrix (a
  Conv's ``kh * kw`` unfolded columns, a Linear's ``H * W`` columns after a ``Flatten``, a head's
  ``head_dim`` columns of ``o_proj``).

:func:`discover` is a small graph of our own, not Torch-Pruning's DepGraph (measured in
``benchmarks/RESULTS.md``: DepGraph groups Sequential MLPs and CNNs in 0.05 s, but did not finish
tracing a one-layer LLaMA of transformers 5 in 5 minutes, and its groups carry no notion of the
consumer columns OBS compensates in). It understands:

* ``nn.Sequential`` chains (not overriding ``forward``): Linear/Conv -> element-wise activations,
  dropout, per-channel BatchNorm, pooling, ``Flatten`` -> Linear/Conv;
* Hugging Face blocks, as the layout registry (:mod:`lightning_prune.models.layouts`) places their parts,
  or by their layers' names in models it does not describe: MLP neurons (gated ``gate_proj``/``up_proj``
  rows or a fused ``gate_up_proj``'s two halves, ``down_proj`` columns; GPT-2's ``c_fc``/``c_proj``;
  BERT's ``intermediate.dense``/``output.dense``) and attention heads (``q_proj``/``k_proj``/``v_proj``
  or a fused ``qkv_proj``'s three parts, ``o_proj`` columns; under grouped-query attention each
  structure is a key/value head with its ``num_key_value_groups`` query heads, so the ratio the model
  relies on is kept). A fused layer holds several slots of one family, at their offsets.

Everything else (residual streams, LayerNorm'd features, grouped convolutions, the classifier's
outputs, a layer used twice) is left alone and listed in the notes. ``pattern="channels"``
(:mod:`lightning_prune.patterns.channels`) prunes these families; :func:`lightning_prune.surgery.shrink.shrink`
removes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_prune.engine.targets import is_hf_conv1d
from lightning_prune.models import layouts

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
    """Where structure ``j`` lives in one layer: rows (``axis="out"``) or columns (``"in"``)
    ``offset + j * width`` to ``offset + (j + 1) * width`` of the layer's ``(d_out, d_in)`` weight matrix.
    ``offset`` places the structures in a fused layer (Phi-3's ``qkv_proj`` rows ``[q | k | v]``: the
    key heads start after the query rows), whose other rows belong to other slots."""

    module: str
    axis: str
    width: int
    offset: int = 0

    def span(self, size: int) -> slice:
        """The rows or columns of ``size`` structures."""
        return slice(self.offset, self.offset + size * self.width)

    def view(self, m: Tensor, size: int) -> Tensor:
        """``(size, ...)`` view of ``m`` (``(d_out, d_in)`` layout) with structure ``j``'s weights in row ``j``."""
        if self.axis == "out":
            return m[self.span(size)].reshape(size, self.width * m.shape[1])
        return m[:, self.span(size)].reshape(m.shape[0], size, self.width).transpose(0, 1).reshape(size, -1)

    def clear(self, m: Tensor, size: int, gone: Tensor) -> None:
        """Set the weights of the ``gone`` structures (a boolean per structure) in ``m`` (a view, written
        through: ``(d_out, d_in)`` layout) to ``False``/zero."""
        if self.axis == "out":
            m[self.span(size)].unflatten(0, (size, self.width))[gone] = False
        else:
            m[:, self.span(size)].unflatten(1, (size, self.width))[:, gone] = False


def tiles(slots: Sequence[Slot], size: int, dims: Mapping[tuple[str, str], int]) -> bool:
    """Whether ``slots`` cover every layer's axis exactly: per ``(module, axis)`` their spans of ``size``
    structures lie side by side from 0 to ``dims[(module, axis)]`` (a fused layer: several slots)."""
    spans: dict[tuple[str, str], list[slice]] = {}
    for s in slots:
        spans.setdefault((s.module, s.axis), []).append(s.span(size))
    for key, found in spans.items():
        end = 0
        for span in sorted(found, key=lambda x: x.start):
            if span.start != end:
                return False
            end = span.stop
        if end != dims[key]:
            return False
    return True


@dataclass(frozen=True)
class Family:
    """Interchangeable structures: removing any of them touches the same layers. ``fields``: the config
    keys its size gives, ``(key, per structure, constant)`` for ``key = size * per + constant`` (a Hugging
    Face model's ``intermediate_size``; ``num_attention_heads``, ``head_dim`` of heads); ``reads_config``:
    those its module (``name``) reads at run time from its ``config``, shared by every block."""

    name: str
    kind: str  # "neurons", "channels" or "heads"
    size: int
    producers: tuple[Slot, ...]
    consumers: tuple[Slot, ...]
    norms: tuple[str, ...] = ()  # per-channel BatchNorms between producer and consumer
    fields: tuple[tuple[str, int, int], ...] = ()
    reads_config: tuple[str, ...] = ()


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


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Hugging Face ``Conv1D`` (whose weight is in x out)."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_hf_conv1d(module) else (w.shape[0], w.shape[1])


def _mlp_family(name: str, module: nn.Module, part: layouts.MLP) -> Family | None:
    """Neurons: the consumer's columns, the producers' rows (``part.fused`` stacked copies in each)."""
    prefix = f"{name}." if name else ""
    size = _dims(module.get_submodule(part.consumer))[1]
    if any(_dims(module.get_submodule(p))[0] != part.fused * size for p in part.producers):
        return None
    producers = tuple(Slot(f"{prefix}{p}", "out", 1, k * size) for p in part.producers for k in range(part.fused))
    consumers = (Slot(f"{prefix}{part.consumer}", "in", 1),)
    return Family(name, "neurons", size, producers, consumers, fields=((part.size_key, 1, 0),))


def _attention_family(name: str, module: nn.Module, part: layouts.Attention, notes: list[str]) -> Family | None:
    """Heads; under grouped-query attention one structure is a key/value head with its query heads."""
    if part.fixed:
        notes.append(f"{name}: {part.fixed}")
        return None
    prefix = f"{name}." if name else ""
    head_dim, rep = getattr(module, part.head_dim, None), getattr(module, part.groups, 1)
    ok = isinstance(head_dim, int) and isinstance(rep, int) and head_dim > 0 and rep > 0
    if ok and part.qkv:  # rows [q (kv * rep heads) | k (kv heads) | v (kv heads)]
        rows = _dims(module.get_submodule(part.qkv))[0]
        kv = rows // ((rep + 2) * head_dim)
        ok = rows == (rep + 2) * kv * head_dim
        names, offsets = (part.qkv,) * 3, (0, kv * rep * head_dim, (kv * rep + kv) * head_dim)
    elif ok:
        q, k, v = (_dims(module.get_submodule(n))[0] for n in part.inputs)
        kv = k // head_dim
        ok = k == v == kv * head_dim and q == kv * rep * head_dim
        names, offsets = part.inputs, (0, 0, 0)
    if not ok or _dims(module.get_submodule(part.o or ""))[1] != kv * rep * head_dim:
        notes.append(f"{name}: attention whose head layout (head_dim, num_key_value_groups) is not readable")
        return None
    widths = (rep * head_dim, head_dim, head_dim)
    producers = tuple(Slot(f"{prefix}{n}", "out", w, off) for n, w, off in zip(names, widths, offsets))
    fields = tuple(
        (key, per, const)
        for key, per, const in ((part.kv_heads_key, 1, 0), (part.heads_key, rep, 0), (part.head_dim_key, 0, head_dim))
        if key
    )
    consumers = (Slot(f"{prefix}{part.o}", "in", rep * head_dim),)
    return Family(name, "heads", kv, producers, consumers, fields=fields, reads_config=part.reads_config)


def _hf_families(model: nn.Module, notes: list[str]) -> list[Family]:
    """Families of the parts the layout registry places in registered Hugging Face models, and of the parts
    found by their layers' names (:data:`~lightning_prune.models.layouts.GENERIC_PARTS`) everywhere else."""
    placed, holders = layouts.parts_by_name(model)
    families = []
    for name, mod in model.named_modules():
        if name in placed:
            parts: tuple[layouts.Part, ...] = (placed[name],)
        elif any(layouts.within(h, name) for h in holders):
            continue  # the registry describes that model whole
        else:
            parts = layouts.GENERIC_PARTS
        part = next((p for p in parts if layouts.present(p, mod)), None)
        if isinstance(part, layouts.MLP):
            family = _mlp_family(name, mod, part)
        elif isinstance(part, layouts.Attention):
            family = _attention_family(name, mod, part, notes)
        else:
            continue
        if family is not None:
            families.append(family)
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
