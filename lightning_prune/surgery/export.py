"""Export 2:4-pruned layers to the GPU's semi-structured sparse kernels.

A mask only saves time once the weight is stored in a format a kernel can skip zeros in. For 2:4
that is torch's :func:`torch.sparse.to_sparse_semi_structured` (cuSPARSELt or CUTLASS; fp16/bf16,
also int8, on CUDA GPUs of compute capability 8.0 and newer). :func:`export_semi_structured`
checks everything first and converts nothing unless every requested layer can be converted, then
verifies each converted layer's outputs against the dense weights with zeros (restoring the dense
weights if any differs), so a model never silently changes what it computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from lightning_prune.engine.targets import is_hf_conv1d, is_prunable_layer
from lightning_prune.patterns import NM

TWO_FOUR = NM(2, 4)
DTYPES = (torch.float16, torch.bfloat16)
# relative error of a layer's output that still counts as equal: accumulation order differs
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _to_sparse(weight: Tensor) -> Tensor:
    return torch.sparse.to_sparse_semi_structured(weight)


def _min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """Rows and columns a semi-structured weight must be a multiple of, for torch's backend in use."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT
    if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS or not _has_cusparselt():
        cls = SparseSemiStructuredTensorCUTLASS
    config = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return config.sparse_min_rows, config.sparse_min_cols


def _has_cusparselt() -> bool:
    return bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())


def is_two_four(weight: Tensor | None) -> bool:
    """Whether every group of 4 consecutive input weights of every row has at least 2 zeros."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((TWO_FOUR.pruned_per_group(weight.detach() == 0) >= 2).all())


def _two_four_layer(module: nn.Module) -> bool:
    """A prunable layer other than Linear (HF ``Conv1D``, convolutions) that is 2:4 along its inputs."""
    if not is_prunable_layer(module):
        return False
    w = module.weight.detach()
    return is_two_four(w.T if is_hf_conv1d(module) else w.flatten(1))


def export_semi_structured(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    check_rows: int = 64,
) -> list[str]:
    """Store the weights of 2:4-sparse ``nn.Linear`` layers as semi-structured sparse tensors, in place.

    Args:
        model: on a CUDA device, in float16 or bfloat16 (``model.half().cuda()``), pruned with
            ``pattern="2:4"`` (any criterion).
        include: glob patterns of module names to convert; each must be a 2:4-sparse Linear.
            Default: every Linear whose weight is 2:4 sparse (a dense ``lm_head`` is left alone).
        exclude: glob patterns of module names to leave dense. Each pattern (of either list) must
            match a module: a typo would silently convert a layer meant to stay dense.
        check_rows: rows of the random input each converted layer's output is verified on (>= 1).

    Returns:
        The names of the converted modules. The weights become non-trainable (``requires_grad=False``):
        export is for inference.

    Raises:
        ValueError: a named layer is not a Linear, not 2:4 sparse, or has a dtype or shape the
            kernels do not take (the message names it); nothing was converted.
        RuntimeError: not on a CUDA GPU with 2:4 kernels (compute capability >= 8.0), or a converted
            layer's outputs differ from the dense ones (every weight is restored).
    """
    modules = dict(model.named_modules())
    for arg, patterns in (("include", include), ("exclude", exclude)):
        _check_patterns(arg, patterns, [n for n in modules if n], type(model).__name__)
    if isinstance(check_rows, bool) or not isinstance(check_rows, int) or check_rows < 1:
        raise ValueError(
            f"`check_rows={check_rows!r}`: each converted layer is verified on at least 1 row of random input "
            "(0 rows would check nothing). Nothing was converted"
        )
    names = _chosen_layers(model, modules, include, exclude)
    _check_kernels_take(modules, names)
    _check_device([modules[n].weight for n in names], names)
    _convert_verified(modules, names, check_rows)
    return names


def _chosen_layers(
    model: nn.Module, modules: dict[str, nn.Module], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    """The Linear layers ``include``/``exclude`` choose, each 2:4 sparse; refused with the reason if none."""
    if include is not None:
        names = [n for n in modules if n and any(fnmatchcase(n, p) for p in include)]
        if not names:
            raise ValueError(f"`include={list(include)}` matches no module of {type(model).__name__}")
        if bad := [n for n in names if type(modules[n]) is not nn.Linear]:
            raise ValueError(f"`include` names modules that are not nn.Linear: {bad[:5]} (only Linear layers export)")
        if bad := [n for n in names if not is_two_four(modules[n].weight)]:
            raise ValueError(
                f"`include` names layers whose weights are not 2:4 sparse: {bad[:5]}; prune them with pattern='2:4'"
            )
    else:
        names = [n for n, m in modules.items() if type(m) is nn.Linear and is_two_four(m.weight)]
    chosen = names
    names = [n for n in names if not any(fnmatchcase(n, p) for p in exclude or ())]
    if chosen and not names:
        raise ValueError(
            f"`exclude={list(exclude or ())}` leaves none of the {len(chosen)} 2:4-sparse Linear layers "
            f"{chosen[:5]} to convert. Nothing was converted"
        )
    if not names:
        others = [n for n, m in modules.items() if type(m) is not nn.Linear and _two_four_layer(m)]
        hint = (
            f"; {others[:3]} are 2:4 but not nn.Linear (torch's semi-structured kernels serve F.linear only: "
            "GPT-2's Conv1D and convolutions stay dense)"
            if others
            else ": prune with pattern='2:4' first"
        )
        raise ValueError(f"no nn.Linear of {type(model).__name__} has 2:4-sparse weights to export{hint}")
    return names


def _check_kernels_take(modules: dict[str, nn.Module], names: list[str]) -> None:
    """Every layer's dtype and shape are ones the 2:4 kernels take (all checked before any converts)."""
    for n in names:
        w = modules[n].weight
        if w.dtype not in DTYPES:
            raise ValueError(
                f"layer {n!r} is {w.dtype}; 2:4 kernels take {[str(d) for d in DTYPES]}: cast the model first "
                "(model.half() or model.to(torch.bfloat16)). Nothing was converted"
            )
    for n in names:
        w = modules[n].weight
        rows, cols = _min_shape(w.dtype)
        if w.shape[0] % rows or w.shape[1] % cols:
            raise ValueError(
                f"layer {n!r} has weight shape {tuple(w.shape)}; 2:4 kernels need multiples of ({rows}, {cols}) in "
                f"{w.dtype}: leave it dense with exclude=[{n!r}]. Nothing was converted"
            )


def _convert_verified(modules: dict[str, nn.Module], names: list[str], check_rows: int) -> None:
    """Convert each layer, checking its outputs on random rows; any failure restores every dense weight."""
    dense: dict[str, nn.Parameter] = {}
    try:
        for n in names:
            module = modules[n]
            w = module.weight
            x = torch.randn(check_rows, w.shape[1], dtype=w.dtype, device=w.device)
            with torch.no_grad():
                expected = module(x)
            dense[n] = w
            module.weight = nn.Parameter(_to_sparse(w.detach()), requires_grad=False)
            with torch.no_grad():
                got = module(x)
            error = float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))
            if not error <= TOLERANCE[w.dtype]:
                raise RuntimeError(
                    f"layer {n!r}: the semi-structured weight's outputs differ from the dense ones by {error:.3g} "
                    f"(relative; allowed {TOLERANCE[w.dtype]:g}); every layer was restored to its dense weight"
                )
    except BaseException:
        for n, w in dense.items():
            modules[n].weight = w
        raise


def _check_patterns(arg: str, patterns: Sequence[str] | None, names: Sequence[str], model: str) -> None:
    """Each pattern must match a module: a typo would convert the layer meant to stay dense (or skip one
    meant to convert), and a string would be read as its characters (``"*"`` matches every module)."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        raise ValueError(f"`{arg}` must be a list of glob patterns, got the string {patterns!r}: pass [{patterns!r}]")
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"`{arg}` pattern {pattern!r} matches no module of {model} (module names such as "
                f"{list(names)[:3]}). Nothing was converted"
            )


def _check_device(weights: list[Tensor], names: list[str]) -> None:
    devices = {w.device for w in weights}
    if any(d.type != "cuda" for d in devices):
        where = sorted(str(d) for d in devices)
        raise RuntimeError(
            f"2:4 semi-structured kernels run on CUDA GPUs only, and {names[0]!r} ... is on {where}: move the model "
            "with model.cuda() first (on the CPU a 2:4 model stays dense, with its zeros). Nothing was converted"
        )
    for d in devices:
        if torch.cuda.get_device_capability(d) < (8, 0):
            raise RuntimeError(
                f"2:4 semi-structured kernels need compute capability >= 8.0 (Ampere or newer); {d} has "
                f"{torch.cuda.get_device_capability(d)}. Nothing was converted"
            )
