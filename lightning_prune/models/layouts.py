"""Where the parts of a model architecture live: one registry that every kind of surgery reads.

A Hugging Face architecture is described once, as data: an :class:`Architecture` registered by its
``config.model_type`` names the block list, the attention and MLP layouts inside a block (fused
projections included), the MoE router and experts, the norms, the embeddings and the output head,
and the config keys that hold each size. Structure discovery (:mod:`lightning_prune.models.graph`),
config writing (:mod:`lightning_prune.models.hf_config`), ``shrink``, ``prune_blocks``,
``prune_experts`` and block-by-block calibration read it, so a decoder architecture is added here
and nowhere else.

A model not in the registry (another ``model_type``, or any ``nn.Module``) is read by attribute names
(:data:`GENERIC_PARTS`: ``gate_proj``/``up_proj``/``down_proj``; ``q_proj``...``o_proj`` with a
``head_dim``; GPT-2's ``c_fc``/``c_proj``; BERT's ``intermediate``/``output``), its MoE blocks are the
modules with ``experts`` and a ``gate`` or ``router``, and its blocks the largest ``nn.ModuleList`` of
modules of one type. Fused layouts (Phi-3's ``qkv_proj`` rows ``[q | k | v]``, ``gate_up_proj`` rows
``[gate | up]``) are applied only where the registry says so: their row order is a convention of the
architecture, which names do not show.

``transformers`` is never imported here: a model of it exists only if it was imported already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

from lightning_prune.engine.targets import is_hf_conv1d

# ----------------------------------------------------------------------------------------- parts of a block


@dataclass(frozen=True)
class MLP:
    """A feed-forward layout: the ``producers`` compute the hidden neurons (their rows), the ``consumer``
    reads them (its columns). ``fused``: each producer stacks that many copies of the neurons' rows
    (Phi-3's ``gate_up_proj``, rows ``[gate | up]``: 2). ``conv1d``: Hugging Face ``Conv1D`` layers
    (GPT-2), whose weights are stored in x out. ``size_key``: the config key of the neuron count."""

    producers: tuple[str, ...]
    consumer: str
    size_key: str = "intermediate_size"
    fused: int = 1
    conv1d: bool = False


@dataclass(frozen=True)
class Attention:
    """Self-attention: ``q``/``k``/``v`` projections, or one fused ``qkv`` whose rows are
    ``[q (heads * head_dim) | k (kv * head_dim) | v (kv * head_dim)]``, and the output projection ``o``
    (``None`` where it lives outside the module: BERT's self-attention). ``head_dim`` and ``groups``
    name the module's attributes holding the head size and the query heads per key/value head; the
    ``*_key`` fields the config keys of the counts. ``reads_config``: keys the module reads at run
    time from the config every block shares (Phi-3: ``num_attention_heads``), so a removal must write
    them. ``fixed``: why the heads are not removed (``None``: they are)."""

    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str | None = "o_proj"
    qkv: str | None = None
    head_dim: str = "head_dim"
    groups: str = "num_key_value_groups"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"
    reads_config: tuple[str, ...] = ()
    fixed: str | None = None
    conv1d: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:
        """The projections that read the block's hidden states."""
        return (self.qkv,) if self.qkv else tuple(n for n in (self.q, self.k, self.v) if n)


@dataclass(frozen=True)
class MoE:
    """A Mixture-of-Experts block: its router (the first of ``router`` present; weight ``[experts, hidden]``)
    and fused ``experts`` whose 3-D parameters read (``reads``: name, dimension of the hidden size) and
    write (``writes``) the residual stream; an optional ``shared`` expert (an :class:`MLP` at that path,
    ``shared_mlp``) and its sigmoid ``shared_gate``. ``count_keys``: where the config keeps the number of
    routed experts (the first present); ``size_key``: the experts' neurons."""

    router: tuple[str, ...] = ("gate", "router")
    experts: str = "experts"
    reads: tuple[tuple[str, int], ...] = (("gate_up_proj", 2),)
    writes: tuple[tuple[str, int], ...] = (("down_proj", 1),)
    shared: str | None = None
    shared_mlp: MLP | None = None
    shared_gate: str | None = None
    count_keys: tuple[str, ...] = ("num_local_experts", "num_experts")
    size_key: str = "intermediate_size"


Part = MLP | Attention | MoE

# GPT-2's and BERT's heads: one reason, said wherever discovery meets them
FIXED_HEADS = (
    "attention heads of this layout (fused c_attn, or query/key/value) are left alone: GPT-2's and BERT's configs "
    "derive the head size from hidden_size / num_attention_heads (GPT-2 also splits c_attn at hidden_size), so no "
    "config of theirs describes fewer heads of the same size"
)
GATED = MLP(("gate_proj", "up_proj"), "down_proj")
FUSED_GATED = MLP(("gate_up_proj",), "down_proj", fused=2)
GPT2_MLP = MLP(("c_fc",), "c_proj", size_key="n_inner", conv1d=True)
BERT_MLP = MLP(("intermediate.dense",), "output.dense")
ATTENTION = Attention()
_FIXED = dict(kv_heads_key=None, head_dim_key=None, fixed=FIXED_HEADS)  # their configs hold neither key
GPT2_ATTENTION = Attention(None, None, None, "c_proj", qkv="c_attn", heads_key="n_head", conv1d=True, **_FIXED)
BERT_SELF_ATTENTION = Attention("query", "key", "value", None, **_FIXED)
GENERIC_MOE = MoE()
# what discovery tries, in order, on every module of a model the registry does not describe
GENERIC_PARTS: tuple[MLP | Attention, ...] = (GATED, GPT2_MLP, BERT_MLP, ATTENTION, GPT2_ATTENTION, BERT_SELF_ATTENTION)


def layer(module: nn.Module, path: str | None, conv1d: bool = False) -> nn.Module | None:
    """The Linear (``conv1d``: Hugging Face ``Conv1D``) at dotted ``path`` in ``module``, else ``None``."""
    child = submodule(module, path)
    if child is None:
        return None
    return child if (is_hf_conv1d(child) if conv1d else isinstance(child, nn.Linear)) else None


def submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """The module at dotted ``path`` (``""``: ``module`` itself), else ``None``."""
    if path is None:
        return None
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def present(part: Part, module: nn.Module) -> bool:
    """Whether ``module`` has ``part``'s layers, of their kinds (what discovery by names checks). Attention
    whose heads stay (``fixed``) only needs its inputs: it gives a note, not a family."""
    if isinstance(part, MoE):
        return isinstance(getattr(module, part.experts, None), nn.Module) and router_of(part, module) is not None
    if isinstance(part, Attention) and part.fixed:
        return all(submodule(module, n) is not None for n in part.inputs)
    names = (
        (*part.producers, part.consumer) if isinstance(part, MLP) else (*part.inputs, *((part.o,) if part.o else ()))
    )
    return all(layer(module, n, part.conv1d) is not None for n in names)


def router_of(part: MoE, module: nn.Module) -> str | None:
    """The attribute holding ``module``'s router: the first of ``part.router`` that is a module."""
    return next((a for a in part.router if isinstance(getattr(module, a, None), nn.Module)), None)


# ------------------------------------------------------------------------------------ whole architectures


@dataclass(frozen=True)
class Architecture:
    """One architecture family. Paths of the blocks, final norm and embeddings are relative to the base
    model (``model.model``, ``model.transformer``, ``model.bert``, or the model itself: ``base_model``),
    ``lm_head`` to the model; part paths are relative to a block (``""``: the block itself). ``mlp`` holds
    one of ``mlp_parts`` or the ``moe`` block (Qwen2-MoE mixes them). ``norms``: the block's norms over
    the residual stream; ``embedding_norm``: one right after the embeddings (BERT). ``embed_scale``: the
    token embeddings are multiplied by sqrt(hidden size); ``norm_offset``: RMSNorms scale by
    ``offset + weight`` (Gemma: 1). ``derived``: modules of a block whose size the config derives from
    the hidden size though they do not carry the residual stream (OLMoE's q_norm over all heads).
    ``complete``: every reader and writer of the residual stream is listed (BERT's pooler and task heads
    are not)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str | None
    attention: str = "self_attn"
    attention_parts: tuple[Attention, ...] = (ATTENTION,)
    mlp: str = "mlp"
    mlp_parts: tuple[MLP, ...] = (GATED,)
    moe: MoE | None = None
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str | None = "norm"
    embedding_norm: str | None = None
    embeddings: tuple[str, ...] = ("embed_tokens",)
    lm_head: str | None = "lm_head"
    embed_scale: bool = False
    norm_offset: float = 0.0
    hidden_key: str = "hidden_size"
    layers_key: str = "num_hidden_layers"
    per_block: tuple[str, ...] = ("layer_types",)
    derived: tuple[str, ...] = ()
    complete: bool = True

    def config_keys(self) -> dict[str, str]:
        """Which config key holds each size: ``{"hidden", "layers", "intermediate", "heads", "kv_heads",
        "head_dim", "experts", "expert_intermediate", "shared_intermediate"}`` where this family has it."""
        keys = {"hidden": self.hidden_key, "layers": self.layers_key}
        if self.mlp_parts:
            keys["intermediate"] = self.mlp_parts[0].size_key
        if self.attention_parts:
            a = self.attention_parts[0]
            keys.update(
                heads=a.heads_key,
                **{k: v for k, v in (("kv_heads", a.kv_heads_key), ("head_dim", a.head_dim_key)) if v},
            )
        if self.moe is not None:
            keys.update(experts=self.moe.count_keys[0], expert_intermediate=self.moe.size_key)
            if self.moe.shared_mlp is not None:
                keys["shared_intermediate"] = self.moe.shared_mlp.size_key
        return keys


GENERIC = Architecture("generic", (), None)  # parts by names (GENERIC_PARTS), blocks by the largest ModuleList
REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` under each of its model types; a type registered twice is refused."""
    if taken := [t for t in arch.model_types if t in REGISTRY]:
        raise ValueError(f"model types {taken} are already registered (as {REGISTRY[taken[0]].name!r})")
    for t in arch.model_types:
        REGISTRY[t] = arch
    return arch


# the registry: one entry per architecture family (a decoder architecture is one more entry here)
register(Architecture("llama", ("llama", "mistral", "qwen2"), "layers"))
register(Architecture(
    "phi3", ("phi3",), "layers", mlp_parts=(FUSED_GATED,),
    attention_parts=(Attention(None, None, None, qkv="qkv_proj", reads_config=("num_attention_heads",)),),
))  # fmt: skip
register(Architecture(
    "gemma2", ("gemma2", "gemma3_text"), "layers", embed_scale=True, norm_offset=1.0,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
))  # fmt: skip
register(
    Architecture("mixtral", ("mixtral",), "layers", mlp_parts=(), moe=MoE(("gate",), count_keys=("num_local_experts",)))
)
register(Architecture("qwen2_moe", ("qwen2_moe",), "layers", moe=MoE(
    ("gate",), shared="shared_expert", shared_mlp=replace(GATED, size_key="shared_expert_intermediate_size"),
    shared_gate="shared_expert_gate", count_keys=("num_experts",), size_key="moe_intermediate_size",
)))  # fmt: skip
_OLMOE_HEADS = (
    "attention heads are left alone: OLMoE's q_norm and k_norm normalise over all heads together (one RMSNorm of "
    "num_heads * head_dim), so removing a head changes what the others compute"
)
register(Architecture(
    "olmoe", ("olmoe",), "layers", attention_parts=(Attention(fixed=_OLMOE_HEADS),), mlp_parts=(),
    moe=MoE(("gate",), count_keys=("num_experts",)), derived=("self_attn.q_norm", "self_attn.k_norm"),
))  # fmt: skip
register(Architecture(
    "gpt2", ("gpt2",), "h", attention="attn", attention_parts=(GPT2_ATTENTION,), mlp_parts=(GPT2_MLP,),
    norms=("ln_1", "ln_2"), final_norm="ln_f", embeddings=("wte", "wpe"), hidden_key="n_embd", layers_key="n_layer",
))  # fmt: skip
register(Architecture(
    "bert", ("bert",), "encoder.layer", attention="attention",
    attention_parts=(replace(BERT_SELF_ATTENTION, q="self.query", k="self.key", v="self.value", o="output.dense"),),
    mlp="", mlp_parts=(BERT_MLP,), norms=("attention.output.LayerNorm", "output.LayerNorm"), final_norm=None,
    embedding_norm="embeddings.LayerNorm", lm_head=None, complete=False,
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
))  # fmt: skip


def layout_of(model: nn.Module) -> Architecture:
    """The registered architecture of ``model`` (by ``model.config.model_type``), else :data:`GENERIC`."""
    return REGISTRY.get(getattr(getattr(model, "config", None), "model_type", None), GENERIC)


def embedding_parameters(model: nn.Module, arch: Architecture | None = None) -> list[nn.Parameter]:
    """The parameters of a Hugging Face model's embeddings and output head, each once (tied ones too): what a
    non-embedding parameter count leaves out, as Minitron reports its sizes. ``arch``: default its layout."""
    arch = arch or layout_of(model)
    out = model.get_output_embeddings()
    found = [model.get_input_embeddings().weight, *([out.weight] if out is not None else [])]
    found += [p for n, p in model.named_parameters() if any(e in n for e in arch.embeddings)]
    return list({id(p): p for p in found}.values())


def pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``transformers.PreTrainedModel`` s in ``model`` (itself, or the one a
    LightningModule holds), with their names (``""`` for ``model`` itself)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel) and not any(within(p, name) for p, _ in found):
            found.append((name, module))
    return found


def within(prefix: str, name: str) -> bool:
    """Whether module ``name`` is ``prefix`` or inside it (``""``: the root holds everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def relative(prefix: str, name: str) -> str:
    return name if prefix == "" else name[len(prefix) + 1 :]


def join(*parts: str) -> str:
    """Dotted module path of ``parts``, empty ones left out."""
    return ".".join(p for p in parts if p)


def registered(model: nn.Module) -> list[tuple[str, nn.Module, Architecture]]:
    """The outermost Hugging Face models in ``model`` whose architecture is registered: ``(name, model, layout)``."""
    return [(n, m, a) for n, m in pretrained_models(model) if (a := layout_of(m)) is not GENERIC]


def base_path(model: nn.Module) -> str:
    """Where ``model``'s base model (``model.base_model``: the decoder without its head) is, ``""`` if itself."""
    base = getattr(model, "base_model", model)
    return next((n for n, m in model.named_modules() if m is base), "")


def block_list_path(model: nn.Module, arch: Architecture | None = None) -> str | None:
    """The full path of the block list of ``model`` (a registered Hugging Face model), e.g. ``model.layers``."""
    arch = arch or layout_of(model)
    return None if arch.blocks is None else join(base_path(model), arch.blocks)


def block_parts(arch: Architecture, block: nn.Module) -> list[tuple[str, Part]]:
    """The parts of one ``block`` of ``arch`` that it holds, ``(path in the block, part)``: its attention, its
    dense MLP or MoE block, the MoE's shared expert."""
    out: list[tuple[str, Part]] = []
    attention = submodule(block, arch.attention)
    if attention is not None and (a := next((p for p in arch.attention_parts if present(p, attention)), None)):
        out.append((arch.attention, a))
    mlp = submodule(block, arch.mlp)
    if mlp is not None and arch.moe is not None and present(arch.moe, mlp):
        out.append((arch.mlp, arch.moe))
        shared = submodule(mlp, arch.moe.shared)
        if shared is not None and arch.moe.shared_mlp is not None and present(arch.moe.shared_mlp, shared):
            out.append((join(arch.mlp, arch.moe.shared or ""), arch.moe.shared_mlp))
    elif mlp is not None and (m := next((p for p in arch.mlp_parts if present(p, mlp)), None)):
        out.append((arch.mlp, m))
    return out


def parts_by_name(model: nn.Module) -> tuple[dict[str, Part], list[str]]:
    """The parts the registry places in ``model``, by their full module names, and the names of the
    registered Hugging Face models holding them (whose other modules are no part: the entry describes
    them whole). Modules outside those models are for discovery by names (:data:`GENERIC_PARTS`)."""
    parts: dict[str, Part] = {}
    holders = []
    for prefix, hf, arch in registered(model):
        holders.append(prefix)
        path = block_list_path(hf, arch)
        blocks = submodule(hf, path)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for i, block in enumerate(blocks):
            for where, part in block_parts(arch, block):
                parts[join(prefix, path or "", str(i), where)] = part
    return parts, holders


# ------------------------------------------------------------------------------------ the residual stream


@dataclass(frozen=True)
class Port:
    """A tensor that holds the residual stream's width: parameter ``param`` of module ``module``, whose
    dimension ``dim`` is the hidden size."""

    module: str
    param: str
    dim: int


@dataclass(frozen=True)
class Stream:
    """Everything the hidden size of a registered model lives in (names relative to the model):
    ``embeddings`` (weights ``[n, hidden]``, the token embedding first), ``norms`` (weights ``(hidden,)``:
    the blocks', the embedding's, the final one last), ``readers`` (weights whose input side is the
    hidden size: q/k/v/qkv, gate/up/gate_up/fc, routers and experts' inputs) and ``writers`` (their
    output side, biases included: o, down/proj, experts' outputs), the ``lm_head`` (reads it), whether
    it is ``tied`` to the token embedding, and the ``derived`` modules (:attr:`Architecture.derived`)."""

    arch: Architecture
    hidden_key: str
    hidden: int
    embeddings: tuple[str, ...]
    norms: tuple[str, ...]
    final_norm: str | None
    readers: tuple[Port, ...]
    writers: tuple[Port, ...]
    lm_head: str | None
    tied: bool
    derived: tuple[str, ...] = ()


def _ports(module: nn.Module, prefix: str, names: tuple[str, ...], conv1d: bool, out: bool) -> list[Port]:
    """Linear/Conv1D layers ``names`` as readers (``out=False``) or writers (their biases too)."""
    ports = []
    for n in names:
        full = join(prefix, n)
        ports.append(Port(full, "weight", (0 if out else 1) if not conv1d else (1 if out else 0)))
        if out and getattr(submodule(module, n), "bias", None) is not None:
            ports.append(Port(full, "bias", 0))
    return ports


def _part_ports(part: Part, module: nn.Module, prefix: str) -> tuple[list[Port], list[Port]]:
    """``(readers, writers)`` of one part at ``prefix``."""
    if isinstance(part, MLP):
        return (
            _ports(module, prefix, part.producers, part.conv1d, False),
            _ports(module, prefix, (part.consumer,), part.conv1d, True),
        )
    if isinstance(part, Attention):
        return (
            _ports(module, prefix, part.inputs, part.conv1d, False),
            _ports(module, prefix, (part.o,) if part.o else (), part.conv1d, True),
        )
    router = join(prefix, router_of(part, module) or "")
    experts = join(prefix, part.experts)
    readers = [Port(router, "weight", 1), *(Port(experts, p, d) for p, d in part.reads)]
    if part.shared_gate:
        readers.append(Port(join(prefix, part.shared_gate), "weight", 1))
    return readers, [Port(experts, p, d) for p, d in part.writes]


def stream(model: nn.Module) -> Stream:
    """The residual stream of ``model``, a Hugging Face model whose architecture is registered (see
    :class:`Stream`); a ``ValueError`` for another model, or where the entry names a module it lacks."""
    arch = layout_of(model)
    if arch is GENERIC:
        raise ValueError(
            f"{type(model).__name__} (model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}) "
            f"is not in the layout registry (lightning_prune.models.layouts: {sorted(REGISTRY)})"
        )
    base = base_path(model)
    path = block_list_path(model, arch) or ""
    blocks = submodule(model, path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: the registry's block list {path!r} is not an nn.ModuleList")
    readers: list[Port] = []
    writers: list[Port] = []
    norms: list[str] = []
    derived: list[str] = []
    for i, block in enumerate(blocks):
        prefix = join(path, str(i))
        for where, part in block_parts(arch, block):
            r, w = _part_ports(part, block.get_submodule(where) if where else block, join(prefix, where))
            readers += r
            writers += w
        norms += [join(prefix, n) for n in arch.norms]
        derived += [join(prefix, n) for n in arch.derived]
    norms += [join(base, n) for n in (arch.embedding_norm, arch.final_norm) if n]
    embeddings = tuple(join(base, e) for e in arch.embeddings)
    head = arch.lm_head if arch.lm_head and submodule(model, arch.lm_head) is not None else None
    names = [*embeddings, *norms, *derived, *(p.module for p in (*readers, *writers)), *([head] if head else [])]
    if missing := [n for n in names if submodule(model, n) is None]:
        raise ValueError(f"{type(model).__name__} has no {missing[:5]}: its layout entry {arch.name!r} does not fit")
    tied = head is not None and model.get_submodule(head).weight is model.get_submodule(embeddings[0]).weight
    final = join(base, arch.final_norm) if arch.final_norm else None
    hidden = getattr(model.config, arch.hidden_key)
    return Stream(
        arch,
        arch.hidden_key,
        hidden,
        embeddings,
        tuple(norms),
        final,
        tuple(readers),
        tuple(writers),
        head,
        tied,
        tuple(derived),
    )


# ------------------------------------------------------------------------------------- blocks and their I/O


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_list(
    model: nn.Module,
    blocks: str = "auto",
    *,
    weigh: Callable[[nn.Module], int] | None = None,
    arg: str = "blocks",
    holding: str = "",
    hint: str = "",
) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of blocks, ``(name, list)``. ``"auto"``: among the registered Hugging Face models'
    block lists, else among every ``nn.ModuleList`` of at least two modules of one type, the one that weighs
    most by ``weigh`` (default: its parameters; more than zero; the first on ties); a name: that list.
    ``arg`` names the argument in the errors, ``holding`` says what ``weigh`` counts (``" holding target
    weights"``) and ``hint`` how to name the blocks instead."""
    if not isinstance(blocks, str) or not blocks:
        raise ValueError(
            f"`{arg}` must be 'auto' or the name of an nn.ModuleList (e.g. 'model.layers'), got {blocks!r}"
        )
    if blocks != "auto":
        found = submodule(model, blocks)
        if not isinstance(found, nn.ModuleList) or len(found) < 2:
            raise ValueError(
                f"`{arg}={blocks!r}` is not an nn.ModuleList of at least two blocks in {type(model).__name__}"
            )
        return blocks, found
    weigh = weigh or _params
    paths = [join(p, block_list_path(m, a) or "") for p, m, a in registered(model) if a.blocks is not None]
    for candidates in ([(n, submodule(model, n)) for n in paths], model.named_modules()):
        best, best_weight = None, 0
        for name, module in candidates:
            if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
                continue
            if (w := weigh(module)) > best_weight:
                best, best_weight = (name, module), w
        if best is not None:
            return best
    raise ValueError(
        f"`{arg}='auto'` found no nn.ModuleList of identical blocks{holding} in {type(model).__name__}: "
        f"{hint or f'name it, e.g. {arg}=' + repr('model.layers')}"
    )


def find_blocks(
    model: nn.Module,
    blocks: str = "auto",
    *,
    weigh: Callable[[nn.Module], int] | None = None,
    arg: str = "blocks",
    holding: str = "",
) -> list[tuple[str, nn.Module]]:
    """The blocks, ``(name, module)`` in order: ``"auto"``, those of :func:`find_block_list`; else a glob
    over module names (``"model.layers.*"``; the outermost matches, in ``named_modules`` order)."""
    if not isinstance(blocks, str) or not blocks:
        raise ValueError(f"`{arg}` must be 'auto' or a glob over module names (e.g. 'model.layers.*'), got {blocks!r}")
    if blocks == "auto":
        hint = f"name them with a glob, e.g. {arg}='model.layers.*'"
        name, found = find_block_list(model, weigh=weigh, arg=arg, holding=holding, hint=hint)
        return [(join(name, str(i)), m) for i, m in enumerate(found)]
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and fnmatchcase(name, blocks) and not any(name.startswith(f"{outer}.") for outer, _ in out):
            out.append((name, module))
    if not out:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(f"`{arg}={blocks!r}` matches no module of {type(model).__name__} (top level: {tops})")
    return out


def block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    """A block's input hidden states: its first argument, or ``hidden_states=``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise TypeError(
            "a block's hidden states must be its first argument (or `hidden_states=`), as in Hugging Face "
            f"decoders and encoders; got {type(hidden).__name__}"
        )
    return hidden


def block_output(out: Any, where: str = "a block") -> Tensor:
    """A block's output hidden states: the output, or the first element of the tuple a decoder layer
    returns (transformers 4) or a model output's ``last_hidden_state``. ``where`` names the block in
    the ``TypeError`` for anything else."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(getattr(out, "last_hidden_state", None), Tensor):
        return out.last_hidden_state
    raise TypeError(
        f"{where} returned {type(out).__name__}, not hidden states (a tensor, or a tuple starting with one)"
    )


def model_output(out: Any, where: str, fix: str) -> Tensor:
    """What a model computes, to compare: its output tensor, logits, or an encoder's last hidden states;
    ``where`` and ``fix`` make the ``TypeError`` for anything else."""
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    try:
        return block_output(out)
    except TypeError:
        raise TypeError(f"{where}: cannot compare the model's output of type {type(out).__name__}; {fix}") from None
