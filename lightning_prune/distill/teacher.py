"""The distillation teacher: which one the ``teacher`` argument names, built at fit start, frozen, and under FSDP2
sharded like the student.

The teacher is held beside the model, not inside it: it is not a submodule, so it is in neither the optimizer's
parameters, the checkpoint's ``state_dict``, nor DDP's gradient buckets (each rank holds its own replica). It runs
in eval mode under ``torch.no_grad`` with ``requires_grad=False`` parameters, optionally in ``teacher_dtype``
(``torch.bfloat16`` halves its memory).

Under FSDP2 (a student whose parameters are DTensors) the teacher is sharded like the student, so each rank holds
its shard of the teacher's weights, not a replica: ``fully_shard`` (resharding after forward) on the teacher's
modules that have the names of the student's ``fully_shard`` modules, then on the teacher's root, over the
student's mesh. FSDP2 refuses ``copy.deepcopy`` of a sharded module, so the default teacher's structure is copied
at setup, before ``configure_model`` shards the student, with every parameter and buffer on the meta device (no
memory); at fit start it is sharded and each rank copies its own rows from the student's shards (a student built
inside ``configure_model`` has no structure to copy at setup: it is refused, naming ``teacher``). A checkpoint
path (one file, read whole by each rank) is loaded into that structure (``assign=True``) and then sharded; a
module passed as ``teacher`` is sharded in place. Its forward is a collective (all-gathers of its shards), which
every rank runs, since every rank runs the student.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.targets import is_prunable_layer
from lightning_prune.runtime import sharding

# exactly-zero fraction of the student's Linear/Conv weights above which it is taken for a pruned model
# (a dense trained network has essentially none), so the default teacher (a copy of it) would be sparse
DENSE_ZEROS = 0.01


def check_teacher_arg(teacher: Any) -> None:
    """Refuse a ``teacher`` that is not ``None``, a module with values, or a checkpoint file, naming it."""
    if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
        raise ValueError(f"`teacher` must be None, an nn.Module or a checkpoint path, got {type(teacher).__name__}")
    if isinstance(teacher, nn.Module) and (
        meta := [t for t in (*teacher.parameters(), *teacher.buffers()) if t.is_meta]
    ):
        raise ValueError(
            f"`teacher` has {len(meta)} parameters/buffers on the meta device (shapes, no values): it cannot be "
            "run or moved to the student's device. Load its weights first (e.g. to_empty(device='cpu') then "
            "load_state_dict), or pass its checkpoint path"
        )
    if isinstance(teacher, (str, Path)) and not Path(teacher).is_file():
        raise ValueError(
            f"`teacher` is not a file: {str(teacher)!r}"
            + (
                " (a directory: a distributed checkpoint, as FSDP2 saves, is not read; pass one file holding the "
                "student module's state dict or a one-process Lightning checkpoint, or the dense nn.Module)"
                if Path(teacher).is_dir()
                else ""
            )
        )


def resolve_teacher_dtype(teacher_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``teacher_dtype`` as a torch floating dtype (``"bfloat16"`` and ``"torch.bfloat16"`` read as one), or None."""
    if isinstance(teacher_dtype, str):
        resolved = getattr(torch, teacher_dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"`teacher_dtype` must be a torch floating dtype, got {teacher_dtype!r}")
        teacher_dtype = resolved
    floating = isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point
    if teacher_dtype is not None and not floating:
        raise ValueError(f"`teacher_dtype` must be a torch floating dtype, got {teacher_dtype!r}")
    return teacher_dtype


def copy_module(owner: nn.Module, student: nn.Module, meta: bool = False) -> nn.Module:
    """A deep copy of ``student`` (a submodule of ``owner``, or ``owner`` itself); ``meta``: the structure only,
    every parameter and buffer on the meta device."""
    # a LightningModule student: its trainer (and fabric) are references, not part of the copy
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        if (ref := vars(owner).get(attr)) is not None:
            memo[id(ref)] = None
    if meta:
        for p in student.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for b in student.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(student, memo)


def check_dense(student: nn.Module) -> None:
    """Refuse a student already pruned at fit start as the default (dense) teacher. On sharded weights
    the counts of the local rows are summed over the mesh, so every rank decides alike."""
    zeros, total, mesh = 0, 0, None
    for m in student.modules():
        if is_prunable_layer(m):
            w = m.weight.detach()
            mesh = w.device_mesh if sharding.is_sharded(w) else mesh
            zeros += int((sharding.local(w) == 0).sum())
            total += sharding.local(w).numel()
    if mesh is not None:
        counts = torch.tensor([zeros, total], dtype=torch.float64, device=mesh.device_type)
        torch.distributed.all_reduce(counts, group=mesh.get_group())
        zeros, total = int(counts[0]), int(counts[1])
    if total and zeros / total > DENSE_ZEROS:
        raise ValueError(
            f"Distillation(teacher=None) copies the model at fit start as the dense teacher, but "
            f"{zeros / total:.1%} of its Linear/Conv weights are already exactly zero (pruned before "
            "this fit, or a resumed run): "
            "pass the dense model (a copy taken before pruning) or its checkpoint path as `teacher`"
        )


def load_teacher(teacher: nn.Module, arg: str | Path, student: nn.Module, name: str, assign: bool = False) -> None:
    """Load the checkpoint ``arg`` (a Lightning checkpoint or the student module's state dict) into ``teacher``;
    ``name``: the student module's name in the LightningModule, whose prefix a Lightning checkpoint's keys carry."""
    ckpt = torch.load(arg, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"`teacher={str(arg)!r}` holds no state dict")
    prefix = f"{name}." if name else ""
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        teacher.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        raise ValueError(
            f"`teacher={str(arg)!r}` does not fit the student {type(student).__name__}: {str(err)[:500]}"
        ) from None


def fill_buffers(teacher: nn.Module, student: nn.Module) -> None:
    """Give the teacher's buffers still on meta (non-persistent ones: in no checkpoint) the student's values."""
    buffers = dict(student.named_buffers())
    for bname, b in list(teacher.named_buffers()):
        if b.is_meta and bname in buffers:
            owner, _, leaf = bname.rpartition(".")
            module = teacher.get_submodule(owner)
            module._buffers[leaf] = buffers[bname].detach().clone()


@torch.no_grad()
def copy_student(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's weights into the teacher, shard to shard (both laid out alike), without a gather."""
    for (_, t), (_, s) in zip(
        [*teacher.named_parameters(), *teacher.named_buffers()],
        [*student.named_parameters(), *student.named_buffers()],
        strict=True,
    ):
        sharding.local(t).copy_(sharding.local(s))


@torch.no_grad()
def follow_student(teacher: nn.Module, student: nn.Module) -> None:
    """The default teacher before the first round: the student's state dict copied in, entry by entry (a sharded
    teacher's shards are laid out like the student's)."""
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        sharding.local(t).copy_(sharding.local(s))


def shard_like(teacher: nn.Module, student: nn.Module, mesh: Any) -> None:
    """``fully_shard`` ``teacher`` in place as the FSDP2 ``student`` is: each of its modules named like one of the
    student's ``fully_shard`` modules (children first), then its root, over ``mesh``. Every group reshards after
    forward (a root keeps its parameters gathered by default, for the backward a teacher never runs)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    modules = dict(teacher.named_modules())
    for n, m in reversed(list(student.named_modules())):
        if n and isinstance(m, FSDPModule) and n in modules:
            fully_shard(modules[n], mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)


def check_separate(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that shares parameters with the student (training would move both)."""
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError("`teacher` shares parameters with the student: pass a separate (dense) model or a copy")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def describe(teacher: nn.Module, rank: int) -> str:
    """The teacher's class, what this rank holds of it (its FSDP2 shards, or the whole replica) and its dtype."""
    tensors = [*teacher.parameters(), *teacher.buffers()]
    size = sum(sharding.local(t).numel() * t.element_size() for t in tensors)
    full = sum(t.numel() * t.element_size() for t in tensors)
    where = f"{_size(size)} of weights"
    if any(sharding.is_sharded(t) for t in tensors):
        ranks = next(t for t in tensors if sharding.is_sharded(t)).device_mesh.size()
        where += f" on rank {rank} (its FSDP2 shards of {_size(full)} over {ranks} rank(s))"
    return f"{type(teacher).__name__}, {where} ({next(teacher.parameters()).dtype})"


class TeacherSource:
    """The ``teacher`` argument (``None``: a copy of the student; a module; a checkpoint path) and ``teacher_dtype``,
    turned into the frozen teacher at fit start. Under FSDP2 it keeps the student's structure on meta from setup."""

    def __init__(self, arg: nn.Module | str | Path | None, dtype: torch.dtype | None) -> None:
        self.arg, self.dtype = arg, dtype
        self.skeleton: nn.Module | None = None  # under FSDP2: the student's structure on meta, taken at setup

    def keep_structure(self, owner: nn.Module, student: nn.Module) -> None:
        """Under FSDP2, before ``configure_model`` shards the student: copy its structure (FSDP2 refuses to deepcopy
        a sharded module). Nothing for a module teacher, or a student with no parameters yet or already sharded."""
        params = list(student.parameters())
        if (
            not isinstance(self.arg, nn.Module)
            and self.skeleton is None
            and params
            and not any(sharding.is_sharded(p) for p in params)
        ):
            self.skeleton = copy_module(owner, student, meta=True)

    def build(self, owner: nn.Module, student: nn.Module, name: str, device: torch.device) -> nn.Module:
        """The teacher for ``student`` (named ``name`` in ``owner``): sharded like it if it is sharded."""
        sharded = [p for p in student.parameters() if sharding.is_sharded(p)]
        if sharded:
            return self._build_sharded(owner, student, name, sharded[0].device_mesh, device)
        arg = self.arg
        if isinstance(arg, nn.Module):
            return arg
        teacher = copy_module(owner, student)
        if arg is None:
            check_dense(student)
            return teacher
        load_teacher(teacher, arg, student, name)
        return teacher

    def _build_sharded(
        self, owner: nn.Module, student: nn.Module, name: str, mesh: Any, device: torch.device
    ) -> nn.Module:
        """The teacher of an FSDP2 student, sharded like it (module docstring)."""
        arg = self.arg
        if isinstance(arg, nn.Module):
            if any(sharding.is_sharded(p) for p in arg.parameters()):  # the user sharded it
                return arg
            teacher = arg
        else:
            if self.skeleton is None:
                raise ValueError(
                    f"Distillation(teacher={None if arg is None else str(arg)!r}) under FSDP2 copies the student's "
                    "structure at setup, before configure_model shards it, but "
                    f"{type(student).__name__} had no parameters then (built in configure_model, or sharded "
                    "before the fit): pass the dense teacher as an nn.Module as `teacher`, and Distillation shards "
                    "it like the student"
                )
            teacher, self.skeleton = self.skeleton, None
            if arg is None:
                check_dense(student)
            else:
                load_teacher(teacher, arg, student, name, assign=True)
                fill_buffers(teacher, student)  # non-persistent buffers are in no checkpoint
        if self.dtype is not None:
            teacher.to(dtype=self.dtype)
        shard_like(teacher, student, mesh)
        if any(t.is_meta for t in (*teacher.parameters(), *teacher.buffers())):  # the default: rows from the student
            teacher.to_empty(device=device)
            copy_student(teacher, student)
        return teacher

    def freeze(self, teacher: nn.Module, student: nn.Module, device: torch.device) -> None:
        """On ``device`` in ``dtype`` (a sharded teacher is there since it was sharded), eval mode, no gradients."""
        if not any(sharding.is_sharded(p) for p in student.parameters()):
            teacher.to(device=device)
            if self.dtype is not None:
                teacher.to(dtype=self.dtype)
        teacher.eval()
        teacher.requires_grad_(False)
