"""``prune_hidden``: a smaller hidden size (embedding channels), the axis Minitron finds width pruning cheapest on.

A hidden channel is one coordinate of the residual stream. Removing it removes, in every block at
once, one column of the token embedding, one output row of every writer of the stream (attention's
``o_proj``, the MLP's ``down_proj``, the experts' ``down_proj``, their biases), one input column of
every reader (``q/k/v`` or ``qkv``, ``gate/up`` or ``gate_up``, the router, the experts' inputs,
``lm_head``) and one entry of every norm. The layout registry (:func:`lightning_prune.models.layouts.stream`)
says where all of these live, so every registered decoder gets it.

**Scores** (``score=``), computed from one calibration pass over ``data``:

* ``"obs"`` (default): second-order, with compensation. Every reader ``W`` sees the normalised stream
  ``x`` with input covariance ``H = E[x x^T]``; removing channel ``c`` and refitting the reader's other
  columns optimally costs ``1/2 sum_i W[i, c]^2 / [H^-1]_cc`` (structured OBS,
  :func:`~lightning_prune.solvers.structured.structured_prune`, with every reader of the model as a
  consumer of one shared family). Channels are removed greedily, cheapest first, each reader's
  ``H^-1`` downdated after each removal, and the readers keep their refitted weights: what a removed
  channel carried is read from the channels correlated with it. What is **not** compensated: the
  writers (their removed rows are gone, nothing can produce that coordinate), the norms' statistics
  (see ``norms``), and the model downstream of each reader (left to recovery). The readers' input
  statistics are those of the dense model; a tied ``lm_head`` is scored but not refitted (its weight
  is the embedding).
* ``"activation"``: Minitron's importance (Muralidharan et al. 2024, arXiv:2407.14679): the mean
  ``|norm output|`` of each channel over the calibration tokens, summed over every norm. No compensation.
* ``"magnitude"``: the L2 norm of every weight the channel owns (Torch-Pruning's group norm, no data).

**Norms** (``norms=``). An RMSNorm divides by the root mean square over the channels it has, so after
removing channels its denominator is a mean over fewer of them. ``"rescale"`` (default) multiplies each
norm's weight by ``sqrt(mean_kept E[r^2] / mean_all E[r^2])`` (``r``: the norm's input over the
calibration tokens; for channels that are always zero this is exactly ``sqrt(H / H')``, and the
smaller model computes what the dense one does); ``"keep"`` leaves the weights as they are. Measured in
``benchmarks/RESULTS.md``.

The result is an ordinary Hugging Face checkpoint of the smaller width (``hidden_size`` rewritten,
``head_dim`` written explicitly so the heads keep their size). GPT-2 and BERT are refused: their configs
derive the head size from the hidden size, so a smaller hidden size would need smaller heads too.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.calibration import LossFn, batch_runner, eval_mode, no_kv_cache
from lightning_prune.models import hf_config as hf
from lightning_prune.models import layouts
from lightning_prune.models.layouts import Port, Stream
from lightning_prune.solvers.structured import structured_prune
from lightning_prune.surgery.shrink import Shrunk

SCORES = ("obs", "activation", "magnitude")
NORMS = ("rescale", "keep")


@dataclass
class HiddenStats:
    """What one calibration pass measures, as float64 sums with counts (all-reducible across ranks).

    ``groups``: the readers that read one tensor (``q/k/v`` read the same normalised stream), as port
    indices into ``Stream.readers``, with the sum of ``x x^T`` over their input rows; ``norm_sq``: per
    norm, the sum of its input squared per channel; ``norm_abs``: the sum of ``|output|`` per channel."""

    groups: list[list[int]] = field(default_factory=list)
    covariance: list[Tensor] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    norm_sq: dict[str, Tensor] = field(default_factory=dict)
    norm_abs: dict[str, Tensor] = field(default_factory=dict)
    norm_rows: dict[str, int] = field(default_factory=dict)


def prune_hidden(
    model: nn.Module,
    data: Sequence[Any],
    n: int | float,
    *,
    score: str = "obs",
    norms: str = "rescale",
    loss_fn: LossFn | None = None,
    damp: float = 0.01,
) -> Shrunk:
    """Remove ``n`` hidden channels (an integer, or a fraction of the hidden size) chosen by ``score`` on
    ``data``; returns the smaller model (a copy; ``model`` is untouched), ready for ``save_pretrained``.

    ``n`` must leave a hidden size the config class accepts (LLaMA's needs a multiple of the number of
    attention heads): an integer that does not is refused with the nearest that do; a fraction is
    rounded to the nearest that does. ``Shrunk.notes`` says what was chosen; ``Shrunk.removed`` is
    ``{"hidden": n}``. See the module docstring for ``score``, ``norms`` and what is compensated.
    """
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {SCORES}, got {score!r}")
    if norms not in NORMS:
        raise ValueError(f"`norms` must be one of {NORMS}, got {norms!r}")
    prefix, hf_model, s = hidden_stream(model)
    count = _count(n, hf_model, s)
    data = list(data)
    if not data:
        raise ValueError("`data` gave no batches: prune_hidden scores the channels on calibration batches")
    run = batch_runner(model, loss_fn, "prune_hidden")
    stats = collect_hidden_stats(model, hf_model, s, data, run)
    drop, weights, costs = choose_channels(hf_model, s, stats, count, score, damp)
    scales = norm_scales(s, stats, drop) if norms == "rescale" else {}
    result = remove_hidden(model, drop, weights=weights, norm_scales=scales)
    cost = f", predicted reconstruction cost {float(costs.sum()):.4g}" if costs is not None else ""
    result.notes.append(
        f"hidden size {s.hidden} -> {s.hidden - count}: {count} channels removed by score={score!r}, "
        f"norms={norms!r}{cost}; removed {drop.tolist()[:12]}{' ...' if count > 12 else ''}"
    )
    return result


def hidden_stream(model: nn.Module) -> tuple[str, nn.Module, Stream]:
    """The one registered Hugging Face model in ``model`` and its residual stream; refused where its hidden
    size cannot be cut (none or several such models, heads sized by the hidden size, derived modules,
    a tied and scaled embedding)."""
    found = layouts.registered(model)
    if len(found) != 1:
        raise ValueError(
            f"prune_hidden cuts the hidden size of one Hugging Face model whose architecture is registered "
            f"(lightning_prune.models.layouts: {sorted(layouts.REGISTRY)}); {type(model).__name__} holds "
            f"{[type(m).__name__ for _, m, _ in found] or 'none'}"
        )
    prefix, hf_model, arch = found[0]
    s = layouts.stream(hf_model)
    who = f"{type(hf_model).__name__} ({arch.name})"
    if any(isinstance(p, layouts.Attention) and not p.head_dim_key for p in arch.attention_parts):
        raise ValueError(
            f"{who}: its config derives the head size from the hidden size (hidden = heads x head size), so a "
            "smaller hidden size would need smaller heads as well; prune_hidden keeps the heads and cuts only the "
            "residual stream. Prune MLP neurons (pattern='channels') or blocks (prune_blocks) instead"
        )
    if s.derived:
        raise ValueError(
            f"{who}: {list(s.derived[:2])} take their size from the hidden size without carrying the residual "
            "stream (a norm over all heads), so no config describes a smaller hidden size with them unchanged"
        )
    if s.tied and arch.embed_scale:
        raise ValueError(
            f"{who}: the token embedding is scaled by sqrt(hidden_size) and tied to lm_head, so the new scale "
            "cannot be folded into the embedding without changing the output head; untie it first "
            "(config.tie_word_embeddings=False and a copy of the weight) to cut the hidden size"
        )
    if not arch.complete:
        raise ValueError(f"{who}: the layout registry does not list every reader of its residual stream")
    return prefix, hf_model, s


def allowed_sizes(hf_model: nn.Module, s: Stream) -> list[int]:
    """The hidden sizes below the current one that the config class accepts (with ``head_dim`` kept)."""
    keys = s.arch.config_keys()
    extra = {keys["head_dim"]: _head_dim(hf_model, s)} if "head_dim" in keys else {}
    sizes = []
    for size in range(1, s.hidden):
        try:
            hf.updated_config(hf_model.config, {s.hidden_key: size, **extra})
        except Exception:  # the config class's own validation, whatever it raises
            continue
        sizes.append(size)
    return sizes


def _head_dim(hf_model: nn.Module, s: Stream) -> int:
    """The head size the attention modules use now (from their attribute, else the config)."""
    for module in hf_model.modules():
        value = getattr(module, "head_dim", None)
        if isinstance(value, int) and value > 0:
            return value
    config = hf_model.config
    return getattr(config, "head_dim", None) or s.hidden // config.num_attention_heads


def _count(n: int | float, hf_model: nn.Module, s: Stream) -> int:
    """Channels to remove: an integer, or a fraction in ``(0, 1)`` rounded to the nearest allowed size."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n <= 0:
        raise ValueError(f"`n` must be a number of hidden channels or a fraction in (0, 1), got {n!r}")
    sizes = allowed_sizes(hf_model, s)
    if not sizes:
        raise ValueError(f"{type(hf_model.config).__name__} accepts no hidden size below {s.hidden}")
    if isinstance(n, numbers.Integral) or n >= 1:
        if not isinstance(n, numbers.Integral) or s.hidden - int(n) not in sizes:
            near = sorted(sizes, key=lambda h: abs(s.hidden - h - n))[:4]
            raise ValueError(
                f"`n={n!r}` would leave hidden size {s.hidden - n}, which {type(hf_model.config).__name__} does not "
                f"accept; the nearest it does: remove {sorted(s.hidden - h for h in near)} channels"
            )
        return int(n)
    want = s.hidden * (1 - float(n))
    return s.hidden - min(sizes, key=lambda h: (abs(h - want), h))


@torch.no_grad()
def collect_hidden_stats(
    model: nn.Module, hf_model: nn.Module, s: Stream, data: Sequence[Any], run: Callable[[Any, int], Any]
) -> HiddenStats:
    """One pass over ``data`` with hooks on every reader (its input) and norm (input and output).

    Readers that read one tensor (``q/k/v``; the router and the experts) form one group with one
    covariance: consecutive readers whose input has the same storage. The grouping of the first batch
    must hold for every batch."""
    stats = HiddenStats()
    H = s.hidden
    modules = [hf_model.get_submodule(p.module) for p in s.readers]
    first = [i for i, p in enumerate(s.readers) if i == 0 or p.module != s.readers[i - 1].module]
    calls: list[tuple[int, Tensor]] = []

    def reader_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = layouts.block_input(args, kwargs)
            calls.append((i, x))

        return hook

    def norm_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            r, y = args[0].reshape(-1, H).double(), out.reshape(-1, H).double()
            stats.norm_sq[name] = stats.norm_sq.get(name, 0) + (r * r).sum(0)
            stats.norm_abs[name] = stats.norm_abs.get(name, 0) + y.abs().sum(0)
            stats.norm_rows[name] = stats.norm_rows.get(name, 0) + r.shape[0]

        return hook

    handles = [modules[i].register_forward_pre_hook(reader_hook(i), with_kwargs=True) for i in first]
    handles += [hf_model.get_submodule(n).register_forward_hook(norm_hook(n)) for n in s.norms]
    if s.lm_head is not None:
        head = len(s.readers)
        handles.append(hf_model.get_submodule(s.lm_head).register_forward_pre_hook(reader_hook(head), with_kwargs=True))
    try:
        with eval_mode(model), no_kv_cache(model):
            for b, batch in enumerate(data):
                calls.clear()
                run(batch, b)
                _fold_calls(stats, calls, s, b)
    finally:
        for h in handles:
            h.remove()
    return stats


def _fold_calls(stats: HiddenStats, calls: list[tuple[int, Tensor]], s: Stream, batch: int) -> None:
    """One batch's reader inputs into the group covariances (a new group where the input changes)."""
    groups: list[list[int]] = []
    inputs: list[Tensor] = []
    key = None
    for i, x in calls:
        ports = [i] if i == len(s.readers) else [j for j, p in enumerate(s.readers) if p.module == s.readers[i].module]
        this = (x.untyped_storage().data_ptr(), x.shape[-1])
        if groups and this == key:
            groups[-1] += [j for j in ports if j not in groups[-1]]
        else:
            groups.append(list(ports))
            inputs.append(x)
        key = this
    if batch == 0:
        stats.groups = groups
        stats.covariance = [torch.zeros(s.hidden, s.hidden, dtype=torch.float64) for _ in groups]
        stats.rows = [0] * len(groups)
    elif groups != stats.groups:
        raise RuntimeError(
            "prune_hidden: the readers of the residual stream were called in another grouping on batch "
            f"{batch} than on batch 0 ({len(groups)} groups against {len(stats.groups)}): the model's forward "
            "depends on the batch in a way the statistics cannot follow"
        )
    for g, x in enumerate(inputs):
        x = x.reshape(-1, s.hidden).double()
        stats.covariance[g] += (x.T @ x).cpu()
        stats.rows[g] += x.shape[0]


def _matrix(hf_model: nn.Module, s: Stream, index: int) -> Tensor:
    """Reader ``index`` (``len(readers)``: the lm_head) as a ``(rows, hidden)`` float64 matrix."""
    port = s.readers[index] if index < len(s.readers) else Port(s.lm_head or "", "weight", 1)
    w = getattr(hf_model.get_submodule(port.module), port.param).detach()
    return w.movedim(port.dim, -1).reshape(-1, s.hidden).double()


def choose_channels(
    hf_model: nn.Module, s: Stream, stats: HiddenStats, count: int, score: str, damp: float
) -> tuple[Tensor, dict[int, Tensor] | None, Tensor | None]:
    """``(channels to remove (sorted), refitted reader matrices by reader index or None, costs or None)``."""
    H = s.hidden
    if score == "activation":
        importance = sum(stats.norm_abs[n] / stats.norm_rows[n] for n in s.norms)
        return torch.argsort(importance, stable=True)[:count].sort().values, None, None
    if score == "magnitude":
        return torch.argsort(_group_norms(hf_model, s), stable=True)[:count].sort().values, None, None
    Ws = [torch.cat([_matrix(hf_model, s, i) for i in group]) for group in stats.groups]
    As = [c / max(r, 1) for c, r in zip(stats.covariance, stats.rows)]
    names = [s.readers[g[0]].module if g[0] < len(s.readers) else str(s.lm_head) for g in stats.groups]
    Ws, gone, costs, _ = structured_prune(
        Ws, As, [1] * len(Ws), count, torch.zeros(H, dtype=torch.bool), [None] * len(Ws), damp, names
    )
    weights: dict[int, Tensor] = {}
    for group, W in zip(stats.groups, Ws):
        rows = 0
        for i in group:
            n = _matrix(hf_model, s, i).shape[0]
            if not (i == len(s.readers) and s.tied):  # a tied head is the embedding: not refitted
                weights[i] = W[rows : rows + n]
            rows += n
    return gone.nonzero().flatten(), weights, costs


def _group_norms(hf_model: nn.Module, s: Stream) -> Tensor:
    """Per channel, the L2 norm of every weight it owns (embeddings, norms, readers, writers, lm_head)."""
    total = torch.zeros(s.hidden, dtype=torch.float64)
    params: dict[int, tuple[Tensor, int]] = {}
    ports = [
        *(Port(name, "weight", 1) for name in s.embeddings),
        *(Port(name, "weight", 0) for name in s.norms),
        *s.readers,
        *s.writers,
        *([Port(s.lm_head, "weight", 1)] if s.lm_head else []),
    ]
    for port in ports:
        w = getattr(hf_model.get_submodule(port.module), port.param)
        params[id(w)] = (w, port.dim)  # a tied head is counted once
    for w, dim in params.values():
        total += (w.detach().double() ** 2).movedim(dim, -1).reshape(-1, s.hidden).sum(0)
    return total.sqrt()


def norm_scales(s: Stream, stats: HiddenStats, drop: Tensor) -> dict[str, float]:
    """``norms="rescale"``: per norm, ``sqrt(mean over kept channels of E[r^2] / mean over all of them)``."""
    keep = torch.ones(s.hidden, dtype=torch.bool)
    keep[drop] = False
    out = {}
    for name in s.norms:
        sq = stats.norm_sq[name]
        out[name] = float((sq[keep].mean() / sq.mean().clamp_min(1e-300)).sqrt()) if sq.sum() > 0 else 1.0
    return out


def remove_hidden(
    model: nn.Module,
    drop: Sequence[int] | Tensor,
    *,
    weights: Mapping[int, Tensor] | None = None,
    norm_scales: Mapping[str, float] | None = None,
) -> Shrunk:
    """A copy of ``model`` without the hidden channels ``drop`` (``model`` is untouched).

    ``weights``: refitted reader matrices (``(rows, hidden)``, by index into the stream's readers, the
    lm_head last) to cut instead of the current ones; ``norm_scales``: a factor per norm (by its name in
    the Hugging Face model) applied to ``offset + weight``. The config gets the new hidden size and the
    head size explicitly; a config that does not describe the result is refused, naming the shapes."""
    prefix, hf_model, s = hidden_stream(model)
    drop = sorted({int(d) for d in (drop.tolist() if isinstance(drop, Tensor) else drop)})
    if not drop or drop[0] < 0 or drop[-1] >= s.hidden or len(drop) >= s.hidden:
        raise ValueError(f"`drop` must name between 1 and {s.hidden - 1} channels in 0..{s.hidden - 1}, got {drop[:8]}")
    before = sum(p.numel() for p in model.parameters())
    out = copy.deepcopy(model)
    small = out.get_submodule(prefix) if prefix else out
    keep = torch.tensor([c for c in range(s.hidden) if c not in set(drop)])
    _cut_stream(small, s, keep, weights or {}, norm_scales or {})
    keys = s.arch.config_keys()
    values = {s.hidden_key: len(keep), **({keys["head_dim"]: _head_dim(hf_model, s)} if "head_dim" in keys else {})}
    if problem := hf.check_config(small, values):
        raise ValueError(f"prune_hidden: {problem}; the original is untouched")
    for key, value in values.items():
        setattr(small.config, key, value)
    result = Shrunk(out, {}, {"hidden": len(drop)}, params_before=before, hf_configs={prefix: values})
    result.params_after = sum(p.numel() for p in out.parameters())
    return result


@torch.no_grad()
def _cut_stream(
    small: nn.Module, s: Stream, keep: Tensor, weights: Mapping[int, Tensor], scales: Mapping[str, float]
) -> None:
    """Cut every tensor of the stream to the ``keep`` channels, in place on ``small`` (the copy)."""
    H2 = len(keep)
    embedding = small.get_submodule(s.embeddings[0])
    for name in s.embeddings:
        module = small.get_submodule(name)
        _set(module, "weight", module.weight.index_select(1, keep))
        module.embedding_dim = H2
    if s.arch.embed_scale:  # the new model scales by sqrt(H2): the embedding keeps the old sqrt(H) overall
        module = embedding
        module.weight.mul_(math.sqrt(s.hidden / H2))
        if hasattr(module, "embed_scale"):
            module.embed_scale.fill_(H2**0.5)
            module.scalar_embed_scale = H2**0.5
    offset = s.arch.norm_offset
    for name in s.norms:
        module = small.get_submodule(name)
        w = module.weight.index_select(0, keep)
        if name in scales:
            w = (offset + w) * scales[name] - offset
        _set(module, "weight", w)
        if getattr(module, "bias", None) is not None:
            _set(module, "bias", module.bias.index_select(0, keep))
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (H2,)
    readers = [*s.readers, *([Port(s.lm_head, "weight", 1)] if s.lm_head and not s.tied else [])]
    for i, port in enumerate(readers):
        module = small.get_submodule(port.module)
        w = getattr(module, port.param)
        if i in weights:  # the refitted (rows, hidden) matrix, back into the parameter's layout
            moved = w.movedim(port.dim, -1)
            w = weights[i].to(w.dtype).reshape(moved.shape).movedim(-1, port.dim)
        _set(module, port.param, w.index_select(port.dim, keep))
        _resize(module)
    for port in s.writers:
        module = small.get_submodule(port.module)
        _set(module, port.param, getattr(module, port.param).index_select(port.dim, keep))
        _resize(module)
    if s.tied:
        small.get_submodule(s.lm_head).weight = embedding.weight
        _resize(small.get_submodule(s.lm_head))
    for module in small.modules():  # MoE experts keep their sizes as attributes
        if getattr(module, "hidden_dim", None) == s.hidden and not isinstance(module, nn.Linear):
            module.hidden_dim = H2


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _resize(module: nn.Module) -> None:
    """A Linear's ``in_features``/``out_features`` follow its weight."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
