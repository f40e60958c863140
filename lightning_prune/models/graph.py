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
* Hugging Face blocks, by their layers' names: gated MLPs (``gate_proj``/``up_proj`` rows,
  ``down_proj`` columns: LLaMA, Mistral, Qwen), GPT-2's MLP (``c_fc``/``c_proj``), BERT's
  intermediate (``intermediate.dense``/``output.dense``), and attention with ``q_proj``/``k_proj``/
  ``v_proj``/``o_proj`` and a ``head_dim`` (heads; under grouped-query attention each structure is
  a key/value head with its ``num_key_value_groups`` query heads, so the ratio the model relies on
  is kept).

Everything else (residual streams, LayerNorm'd features, grouped convolutions, the classifier's
outputs, a layer used twice) is left alone and listed in the notes. ``pattern="channels"``
(:mod:`lightning_prune.patterns.channels`) prunes these families; :func:`lightning_prune.surgery.shrink.shrink`
removes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_prune.engine.targets import is_hf_conv1d

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
            notes.append(
                f"{name}: attention heads of this layout (fused c_attn, or query/key/value) are left alone: GPT-2's "
                "and BERT's configs derive the head size from hidden_size / num_attention_heads (GPT-2 also splits "
                "c_attn at hidden_size), so no config of theirs describes fewer heads of the same size"
            )
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
