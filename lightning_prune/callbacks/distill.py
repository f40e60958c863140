"""Recovery by distillation from the dense teacher, beside any pruner in ``Trainer.fit``.

How the distillation term reaches the user's loss (the one design choice a user must know about):
Lightning's hooks see the loss (``on_before_backward``) but cannot change it, and asking every user
to edit ``training_step`` would break "one line in your Trainer". So :class:`Distillation`
**wraps the LightningModule's** ``training_step`` at ``setup`` (an instance attribute, never the
class; announced on the console, and removed at ``teardown`` or when the fit fails): the wrapper
calls the user's own ``training_step`` unchanged and returns
``task_weight * loss + kd_weight * KD + squarehead_weight * SquareHead`` in place of ``loss``
(a dict's ``"loss"`` entry is replaced the same way). Lightning then divides, scales and
backpropagates that total exactly as it would the user's loss, so gradient accumulation, AMP and
DDP need nothing else. ``wrap_training_step=False`` leaves ``training_step`` alone: the user adds
``distillation.loss(task_loss)`` themselves (the only way under manual optimization).

Where the student's and teacher's outputs come from: a forward hook on the *student module* (by
default the LightningModule's one child that holds all its trainable parameters, e.g. the Hugging
Face model in ``self.model``; or ``student="name"``, ``""`` for the LightningModule itself) runs the
teacher on the very same arguments the user passed (``self.model(**batch)`` or ``self(x)``), so no
batch format has to be guessed. Only forwards inside the wrapped ``training_step`` in training
mode are distilled: validation, and the pruners' calibration passes (eval mode), see the plain loss.

The teacher is held by this callback, not by the LightningModule: it is not a submodule, so it is
in neither ``configure_optimizers``' ``self.parameters()``, the checkpoint's ``state_dict``, nor
DDP's gradient buckets (each rank holds its own replica). It runs in eval mode under
``torch.no_grad`` with ``requires_grad=False`` parameters, optionally in ``teacher_dtype``
(``torch.bfloat16`` halves its memory).

Under FSDP2 (a student whose parameters are DTensors) the teacher is sharded like the student, so
each rank holds its shard of the teacher's weights, not a replica: ``fully_shard`` (resharding after
forward) on the teacher's modules that have the names of the student's ``fully_shard`` modules,
then on the teacher's root, over the student's mesh. FSDP2 refuses ``copy.deepcopy`` of a sharded
module, so the default teacher's structure is copied at ``setup``, before ``configure_model``
shards the student, with every parameter and buffer on the meta device (no memory); at fit start
it is sharded and each rank copies its own rows from the student's shards (a student built inside
``configure_model`` has no structure to copy at ``setup``: it is refused, naming ``teacher``). A
checkpoint path (one file, read whole by each rank) is loaded into that structure (``assign=True``)
and then sharded; a module passed as ``teacher`` is sharded in place. Its forward is a collective
(all-gathers of its shards), which every rank runs, since every rank runs the student.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.engine.targets import is_prunable_layer
from lightning_prune.runtime import sharding

# exactly-zero fraction of the student's Linear/Conv weights above which it is taken for a pruned model
# (a dense trained network has essentially none), so the default teacher (a copy of it) would be sparse
DENSE_ZEROS = 0.01


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """``T² · mean over positions of KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dimension.

    ``T²`` keeps the gradient's scale independent of the temperature (Hinton et al.). ``mask`` (the
    logits' shape without the last dimension, True = counted) leaves out padding positions. Computed
    in float32 whatever the logits' dtype.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        kl = kl[mask.to(torch.bool)]
    return kl.mean() * temperature**2


def squarehead_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """SquareHead's feature loss: ``Σ_blocks mean((h_s − h_t)²) / (mean(h_t²) + eps)``.

    Each block's MSE is normalised by the teacher's mean squared feature, so every block counts
    alike whatever the scale of its hidden states (they grow with depth in pre-norm transformers).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"squarehead_loss needs one teacher feature per student feature: {len(student)}, {len(teacher)}"
        )
    terms = [(s.float() - t.float()).pow(2).mean() / (t.float().pow(2).mean() + eps) for s, t in zip(student, teacher)]
    return torch.stack(terms).sum()


def output_logits(out: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face), ``["logits"]`` or
    the first tensor of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(
        f"Distillation found no logits in the student's output ({type(out).__name__}): it reads a tensor, `.logits`, "
        "['logits'] or a tuple's first tensor; name the module that returns the logits with student='...'"
    )


def _hidden(out: Any) -> Tensor:
    """A block's hidden states: its output, or the first element of the tuple a decoder layer returns."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"Distillation: a SquareHead block returned {type(out).__name__}, not hidden states")


def find_feature_blocks(model: nn.Module, blocks: str) -> list[str]:
    """Names of the blocks SquareHead matches: ``"auto"``, the decoder's layers (the largest
    ``nn.ModuleList`` of at least two modules of one type, by parameters), or a glob over module names
    (the outermost matches)."""
    if blocks == "auto":
        best, size = [], 0
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
                n = sum(p.numel() for p in module.parameters())
                if n > size:
                    best, size = [f"{name}.{i}" if name else str(i) for i in range(len(module))], n
        if not best:
            raise ValueError(
                f"`squarehead_blocks='auto'` found no nn.ModuleList of identical blocks in {type(model).__name__}: "
                "name them with a glob, e.g. squarehead_blocks='model.layers.*'"
            )
        return best
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and fnmatch.fnmatchcase(name, blocks) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
    if not found:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(f"`squarehead_blocks={blocks!r}` matches no module of {type(model).__name__} (top: {tops})")
    return found


def pair_block(name: str, teacher: nn.Module, blocks: str) -> str:
    """The teacher's module for the student's block ``name``: the same name, else the one module whose
    dotted name ends with the other's (a PEFT student's ``base_model.model.model.layers.0`` and a bare
    teacher's ``model.layers.0``). Anything else is refused, naming the block."""
    names = [n for n, _ in teacher.named_modules() if n]
    if name in names:
        return name
    found = [n for n in names if name.endswith(f".{n}") or n.endswith(f".{name}")]
    found = [n for n in found if len(n.split(".")) == max(len(f.split(".")) for f in found)] if found else []
    if len(found) != 1:
        raise ValueError(
            f"`squarehead_blocks={blocks!r}`: the teacher ({type(teacher).__name__}) has "
            f"{'several' if found else 'no'} block for the student's {name!r}{f' ({found[:3]})' if found else ''}; "
            "SquareHead pairs blocks by name, so the teacher needs the student's architecture"
        )
    return found[0]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


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


class Distillation(Callback):
    """Distil the dense teacher into the pruned student while it trains: logit KD, optionally SquareHead.

    ``Trainer(callbacks=[OBSPruning(target=0.7), Distillation()])``: the training loss becomes
    ``task_weight · loss + kd_weight · KD + squarehead_weight · SquareHead`` (module docstring: how).

    Args:
        teacher: ``None`` (default): a deep copy of the student module, the dense model just before
            the first pruning round. With pruners in the Trainer that have not pruned yet (a dense
            warm-up, as the CLI's runs from scratch have), the copy follows the student: its weights
            are copied from the student's at the start of every training batch, and no distillation
            term is added (it would be 0), until a pruner's first round; from then on the teacher is
            frozen (the weights of the round's last batch, one optimizer step before the round).
            A fit in which no pruner will ever run a round (none in the Trainer, a first round past
            the run's end, a target already reached) is refused before the first step: the term would
            be nothing, or a pull back to the starting weights. A model already pruned at fit start
            (``prune()`` then fit, a resumed run) is refused: the copy would not be dense; pass the
            dense teacher. Or an ``nn.Module`` called like the student; or a checkpoint path (a
            Lightning checkpoint of this LightningModule, or a state dict of the student module)
            loaded into a copy of the student. Under FSDP2 the teacher is sharded like the student
            (a module passed is sharded in place; module docstring).
        kd_weight: weight of the logit KL term.
        temperature: softmax temperature ``T`` of the KL (the term is scaled by ``T²``).
        task_weight: weight of the user's own loss (0: distillation alone).
        squarehead_weight: weight of SquareHead's normalised per-block MSE (0: off).
        squarehead_blocks: ``"auto"`` (the decoder layers) or a glob over the student module's
            module names.
        student: the submodule of the LightningModule whose output holds the logits (``""``: the
            LightningModule itself); ``None`` picks its one child holding every trainable parameter,
            else the LightningModule.
        teacher_dtype: cast the teacher to this floating dtype (``torch.bfloat16``: half its memory).
        wrap_training_step: wrap ``training_step`` (default); ``False``: call :meth:`loss` yourself.
    """

    def __init__(
        self,
        teacher: nn.Module | str | Path | None = None,
        kd_weight: float = 1.0,
        temperature: float = 2.0,
        task_weight: float = 1.0,
        squarehead_weight: float = 0.0,
        squarehead_blocks: str = "auto",
        student: str | None = None,
        teacher_dtype: torch.dtype | str | None = None,
        wrap_training_step: bool = True,
    ) -> None:
        weights = {"kd_weight": kd_weight, "task_weight": task_weight, "squarehead_weight": squarehead_weight}
        for arg, value in weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        if kd_weight == 0 and squarehead_weight == 0:
            raise ValueError("`kd_weight` and `squarehead_weight` are both 0: Distillation would add nothing")
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
        if not isinstance(squarehead_blocks, str) or not squarehead_blocks:
            raise ValueError(f"`squarehead_blocks` must be 'auto' or a glob, got {squarehead_blocks!r}")
        if student is not None and not isinstance(student, str):
            raise ValueError(f"`student` must be None or a submodule name, got {student!r}")
        if isinstance(teacher_dtype, str):
            resolved = getattr(torch, teacher_dtype.removeprefix("torch."), None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"`teacher_dtype` must be a torch floating dtype, got {teacher_dtype!r}")
            teacher_dtype = resolved
        floating = isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point
        if teacher_dtype is not None and not floating:
            raise ValueError(f"`teacher_dtype` must be a torch floating dtype, got {teacher_dtype!r}")
        self.kd_weight, self.temperature, self.task_weight = float(kd_weight), float(temperature), float(task_weight)
        self.squarehead_weight, self.squarehead_blocks = float(squarehead_weight), squarehead_blocks
        self.student_name, self.teacher_dtype, self.wrap_training_step = student, teacher_dtype, wrap_training_step
        self._teacher_arg = teacher
        self.teacher: nn.Module | None = None
        self._student: nn.Module | None = None
        self._blocks: list[str] = []  # SquareHead's blocks in the student module
        self._teacher_blocks: list[str] = []  # the same blocks in the teacher
        self._hooks: list[Any] = []
        self._wrapped: pl.LightningModule | None = None
        self._active = False  # inside the wrapped training_step (or between begin() and loss()), training mode
        self._in_student = False  # inside the student's forward (block hooks only capture then)
        self._captured: dict[str, Any] = {}
        self._module: pl.LightningModule | None = None  # logs the terms
        self._pruners: list[PruningCallback] = []
        self._skeleton: nn.Module | None = None  # under FSDP2: the student's structure on meta, taken at setup
        self._tracking = False  # the default teacher follows the student until a pruner's first round
        self._followed = False  # the tracking teacher has copied the student at least once in this fit
        self._frozen = False  # the teacher is fixed (after the first round, or given)
        self.last_terms: dict[str, Tensor] = {}  # the last step's terms, detached
        self._loss_calls = 0  # calls of loss() in the current training batch (checked without the wrapper)
        self._epoch_loss_calls = 0  # and in the current epoch (manual optimization: steps return nothing)

    # ================================================================ setup: the student, the wrapper
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        name = self._student_name(pl_module)  # fails now on a bad `student`
        found = list(getattr(trainer, "callbacks", []))
        if self._teacher_arg is None and not any(isinstance(cb, PruningCallback) for cb in found):
            callbacks = [type(cb).__name__ for cb in found]
            raise ValueError(
                "Distillation(teacher=None) distils from the dense model as it is just before the pruners' first "
                f"round, and this Trainer has no pruning callback (callbacks: {callbacks}): it would only pull the "
                "model back to its weights at fit start. Add a pruner to the callbacks "
                "(OBSPruning(...), SparseGPT(...), ...), or pass the `teacher` (a dense nn.Module or its checkpoint "
                "path; copy.deepcopy of the model to keep it near its starting weights)"
            )
        student = pl_module.get_submodule(name) if name else pl_module
        params = list(student.parameters())
        # FSDP2 refuses to deepcopy a sharded module: copy the structure now, before configure_model shards it
        if (
            isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)
            and not isinstance(self._teacher_arg, nn.Module)
            and self._skeleton is None
            and params
            and not any(sharding.is_sharded(p) for p in params)
        ):
            self._skeleton = self._copy(pl_module, student, meta=True)
        if not self.wrap_training_step:
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "Distillation(wrap_training_step=True) adds its term to the loss training_step returns, which manual "
                "optimization backpropagates itself: pass wrap_training_step=False and add "
                "distillation.loss(task_loss) before your manual_backward"
            )
        self._wrap(pl_module)

    def _student_name(self, pl_module: pl.LightningModule) -> str:
        if self.student_name is not None:
            try:
                pl_module.get_submodule(self.student_name)
            except AttributeError:
                tops = [n for n, _ in pl_module.named_children()]
                raise ValueError(
                    f"`student={self.student_name!r}` is not a submodule of {type(pl_module).__name__} "
                    f"(children: {tops})"
                ) from None
            return self.student_name
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        for name, child in pl_module.named_children():
            if trainable and trainable <= {id(p) for p in child.parameters()}:
                return name
        return ""

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if "training_step" in vars(pl_module):
            raise ValueError(
                f"{type(pl_module).__name__}.training_step is already replaced on the instance "
                "(another Distillation?): "
                "one Distillation per fit"
            )
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            if not pl_module.training or self._tracking:  # a calibration pass (eval mode), or still dense
                return original(*args, **kwargs)
            self.begin()
            try:
                out = original(*args, **kwargs)
            except BaseException:
                self._reset()
                raise
            if out is None:  # the user skipped this batch
                self._reset()
                return None
            if isinstance(out, dict):
                return {**out, "loss": self.loss(out["loss"])}
            return self.loss(out)

        training_step.__lightning_prune_distillation__ = True  # type: ignore[attr-defined]
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module
        rank_zero_info(
            f"[lightning-prune] Distillation wraps {type(pl_module).__name__}.training_step for this fit: it returns "
            f"{self.task_weight:g}·loss + {self.kd_weight:g}·KD(T={self.temperature:g})"
            + (f" + {self.squarehead_weight:g}·SquareHead" if self.squarehead_weight else "")
        )

    def _unwrap(self) -> None:
        step = vars(self._wrapped).get("training_step") if self._wrapped is not None else None
        if self._wrapped is not None and getattr(step, "__lightning_prune_distillation__", False):
            del self._wrapped.training_step
        self._wrapped = None

    # ================================================================ fit start: the teacher
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self._student_name(pl_module)
        student = pl_module.get_submodule(name) if name else pl_module
        self._module = pl_module
        # a second fit of the same model keeps the teacher of the first (the model is pruned by now)
        reuse = self.teacher is not None and self._student is student
        self._student = student
        sharded = [p for p in student.parameters() if sharding.is_sharded(p)]
        if reuse:
            teacher = self.teacher
        elif sharded:
            teacher = self._make_sharded_teacher(pl_module, student, name, sharded[0].device_mesh)
        else:
            teacher = self._make_teacher(pl_module, student, name)
        assert teacher is not None
        if not sharded:  # a sharded teacher is on the mesh's device, in its dtype, since it was sharded
            teacher.to(device=pl_module.device)
            if self.teacher_dtype is not None:
                teacher.to(dtype=self.teacher_dtype)
        teacher.eval()
        teacher.requires_grad_(False)
        # the default teacher follows the dense student until the first round, if rounds are to come
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]  # type: ignore[attr-defined]
        self._tracking = (
            self._teacher_arg is None and not self._frozen and bool(pruners) and not any(p.history for p in pruners)
        )
        self._pruners = pruners
        self._followed = False
        if not self._tracking:
            self._frozen = True
        shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
        if shared:
            raise ValueError("`teacher` shares parameters with the student: pass a separate (dense) model or a copy")
        self.teacher = teacher
        self._blocks = find_feature_blocks(student, self.squarehead_blocks) if self.squarehead_weight else []
        self._teacher_blocks = [pair_block(b, teacher, self.squarehead_blocks) for b in self._blocks]
        self._register(student, teacher)
        # what this rank holds: its shards of a sharded teacher (FSDP2), the whole of a replica
        tensors = [*teacher.parameters(), *teacher.buffers()]
        size = sum(sharding.local(t).numel() * t.element_size() for t in tensors)
        full = sum(t.numel() * t.element_size() for t in tensors)
        where = f"{_size(size)} of weights"
        if any(sharding.is_sharded(t) for t in tensors):
            ranks = next(t for t in tensors if sharding.is_sharded(t)).device_mesh.size()
            where += f" on rank {pl_module.global_rank} (its FSDP2 shards of {_size(full)} over {ranks} rank(s))"
        rank_zero_info(
            f"[lightning-prune] Distillation teacher: {type(teacher).__name__}, {where} "
            f"({next(teacher.parameters()).dtype}), {len(self._blocks)} SquareHead blocks"
        )

    def _make_teacher(self, pl_module: pl.LightningModule, student: nn.Module, name: str) -> nn.Module:
        arg = self._teacher_arg
        if isinstance(arg, nn.Module):
            return arg
        teacher = self._copy(pl_module, student)
        if arg is None:
            self._check_dense(student)
            return teacher
        self._load(teacher, arg, student, name)
        return teacher

    @staticmethod
    def _check_dense(student: nn.Module) -> None:
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

    @staticmethod
    def _load(teacher: nn.Module, arg: str | Path, student: nn.Module, name: str, assign: bool = False) -> None:
        """Load the checkpoint ``arg`` (a Lightning checkpoint or the student module's state dict) into ``teacher``."""
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

    def _make_sharded_teacher(
        self, pl_module: pl.LightningModule, student: nn.Module, name: str, mesh: Any
    ) -> nn.Module:
        """The teacher of an FSDP2 student, sharded like it (module docstring)."""
        arg = self._teacher_arg
        if isinstance(arg, nn.Module):
            if any(sharding.is_sharded(p) for p in arg.parameters()):  # the user sharded it
                return arg
            teacher = arg
        else:
            if self._skeleton is None:
                raise ValueError(
                    f"Distillation(teacher={None if arg is None else str(arg)!r}) under FSDP2 copies the student's "
                    "structure at setup, before configure_model shards it, but "
                    f"{type(student).__name__} had no parameters then (built in configure_model, or sharded "
                    "before the fit): pass the dense teacher as an nn.Module as `teacher`, and Distillation shards "
                    "it like the student"
                )
            teacher, self._skeleton = self._skeleton, None
            if arg is None:
                self._check_dense(student)
            else:
                self._load(teacher, arg, student, name, assign=True)
                self._fill_buffers(teacher, student)  # non-persistent buffers are in no checkpoint
        if self.teacher_dtype is not None:
            teacher.to(dtype=self.teacher_dtype)
        shard_like(teacher, student, mesh)
        if any(t.is_meta for t in (*teacher.parameters(), *teacher.buffers())):  # the default: rows from the student
            teacher.to_empty(device=pl_module.device)
            self._copy_student(teacher, student)
        return teacher

    @staticmethod
    def _fill_buffers(teacher: nn.Module, student: nn.Module) -> None:
        buffers = dict(student.named_buffers())
        for bname, b in list(teacher.named_buffers()):
            if b.is_meta and bname in buffers:
                owner, _, leaf = bname.rpartition(".")
                module = teacher.get_submodule(owner)
                module._buffers[leaf] = buffers[bname].detach().clone()

    @staticmethod
    @torch.no_grad()
    def _copy_student(teacher: nn.Module, student: nn.Module) -> None:
        """Copy the student's weights into the teacher, shard to shard (both laid out alike), without a gather."""
        for (_, t), (_, s) in zip(
            [*teacher.named_parameters(), *teacher.named_buffers()],
            [*student.named_parameters(), *student.named_buffers()],
            strict=True,
        ):
            sharding.local(t).copy_(sharding.local(s))

    @staticmethod
    def _copy(pl_module: pl.LightningModule, student: nn.Module, meta: bool = False) -> nn.Module:
        # a LightningModule student: its trainer (and fabric) are references, not part of the copy
        memo: dict[int, Any] = {}
        for attr in ("_trainer", "_fabric"):
            if (ref := vars(pl_module).get(attr)) is not None:
                memo[id(ref)] = None
        if meta:  # the structure only: every parameter and buffer on the meta device
            for p in student.parameters():
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for b in student.buffers():
                memo[id(b)] = torch.empty_like(b, device="meta")
        return copy.deepcopy(student, memo)

    def _register(self, student: nn.Module, teacher: nn.Module) -> None:
        self._remove_hooks()
        self._hooks.append(student.register_forward_pre_hook(self._student_pre, with_kwargs=True))
        self._hooks.append(student.register_forward_hook(self._student_post, with_kwargs=True))
        for b, tb in zip(self._blocks, self._teacher_blocks):
            for who, model, name in (("student", student, b), ("teacher", teacher, tb)):
                hook = functools.partial(self._block, who, b)  # both captured under the student's block name
                self._hooks.append(model.get_submodule(name).register_forward_hook(hook))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a fit in which the default teacher would wait for a round that never comes (every pruner's
        on_fit_start has run by now: their schedules are resolved against this Trainer)."""
        if not self._tracking or any(p.history for p in self._pruners):  # rounds restored after fit start: the
            return  # first batch refuses that, naming it
        reasons = [(p, p.no_round_in_run(trainer)) for p in self._pruners]
        if all(why is not None for _, why in reasons):
            listed = "; ".join(f"{type(p).__name__}: {why}" for p, why in reasons)
            raise ValueError(
                "Distillation(teacher=None) takes the dense model at the pruners' first round as its teacher and "
                f"distils from then on, and no pruner has a round in this fit ({listed}): it would add nothing for the "
                "whole run. Bring a round into the run (start_step/start_epoch, or a longer run), or pass the dense "
                "`teacher`"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._loss_calls = 0
        if not self._tracking:
            return
        if any(p.history for p in self._pruners):  # the first round ran at the end of the last batch
            if not self._followed:  # or a checkpoint restored after fit start (FSDP2 restores then) had rounds
                raise ValueError(
                    "Distillation(teacher=None) found the pruners' rounds restored from a checkpoint after fit "
                    "start, before it could copy the dense model (the weights it holds are not the dense model's): "
                    "pass the dense model (a copy taken before pruning) or its checkpoint path as `teacher`"
                )
            self._tracking, self._frozen = False, True
            rank_zero_info(
                f"[lightning-prune] Distillation: the teacher is the dense model of step {trainer.global_step - 1}, "
                "just before the first pruning round; distilling from now on"
            )
            return
        assert self.teacher is not None and self._student is not None
        with torch.no_grad():
            for t, s in zip(self.teacher.state_dict().values(), self._student.state_dict().values()):
                sharding.local(t).copy_(sharding.local(s))  # a sharded teacher's shards are laid out like the student's
        self._followed = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Without the wrapper the term is the user's to add: a step that returned a loss without calling
        :meth:`loss` trained without it (and so would every other), so it is refused now, not found at the end."""
        if not self.wrap_training_step and outputs is not None and self._loss_calls == 0:
            self._no_loss_call(pl_module, f"batch {batch_idx}")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_loss_calls = 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fallback for steps whose output Lightning does not pass on: no call in a whole epoch."""
        if not self.wrap_training_step and self._epoch_loss_calls == 0:
            self._no_loss_call(pl_module, f"epoch {trainer.current_epoch}")

    def _no_loss_call(self, pl_module: pl.LightningModule, where: str) -> None:
        raise RuntimeError(
            f"Distillation(wrap_training_step=False) saw no call of distillation.loss(task_loss) in "
            f"{type(pl_module).__name__}.training_step ({where}), so it trained without the distillation term: call "
            "distillation.begin() at the start of training_step and return distillation.loss(loss) (or add it "
            "before manual_backward), or pass wrap_training_step=True"
        )

    # ================================================================ capture
    def _student_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active:
            if "student" in self._captured:
                raise RuntimeError(
                    "Distillation pairs one forward of the student with the loss, and training_step called "
                    f"{type(module).__name__} twice: name the module called once per step with student='...'"
                )
            self._in_student = True

    def _student_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not (self._active and self._in_student):
            return
        self._in_student = False
        self._captured["student"] = output_logits(out)
        assert self.teacher is not None
        t_args, t_kwargs = args, kwargs
        if (dtype := self.teacher_dtype) is not None:  # floating inputs (a classifier's features) in its dtype

            def cast(v: Any) -> Any:
                return v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v

            t_args, t_kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        with torch.no_grad():
            self._captured["teacher"] = output_logits(self.teacher(*t_args, **t_kwargs)).detach()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.shape == self._captured["student"].shape[:-1]:
            self._captured["mask"] = mask

    def _block(self, who: str, name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self._active and (self._in_student or who == "teacher"):
            self._captured.setdefault(who + "_blocks", {})[name] = _hidden(out)

    # ================================================================ the loss
    def begin(self) -> None:
        """Start capturing the student's next forward (the wrapper calls this; with
        ``wrap_training_step=False``, call it at the start of ``training_step``)."""
        if self.teacher is None:
            raise RuntimeError("Distillation has no teacher yet: it is built at fit start (on_fit_start)")
        self._reset()
        self._active = not self._tracking  # still dense: nothing to distil, the teacher is not run

    def _reset(self) -> None:
        self._active, self._in_student, self._captured = False, False, {}

    def terms(self) -> dict[str, Tensor]:
        """The distillation terms of the student forward captured since :meth:`begin`:
        ``{"kd": ..., "squarehead": ...}`` (each present when its weight is not 0)."""
        if "student" not in self._captured:
            raise RuntimeError(
                f"Distillation saw no forward of the student ({type(self._student).__name__}) in this training_step: "
                "name the module training_step calls with student='...' ('' for the LightningModule itself)"
            )
        s, t = self._captured["student"], self._captured["teacher"]
        if s.shape != t.shape:
            raise ValueError(f"the teacher's logits {tuple(t.shape)} do not match the student's {tuple(s.shape)}")
        out: dict[str, Tensor] = {}
        if self.kd_weight:
            out["kd"] = kd_loss(s, t, self.temperature, self._captured.get("mask"))
        if self.squarehead_weight:
            sb, tb = self._captured.get("student_blocks", {}), self._captured.get("teacher_blocks", {})
            missing = [b for b in self._blocks if b not in sb or b not in tb]
            if missing:
                raise RuntimeError(f"Distillation: SquareHead blocks {missing[:3]} did not run in this forward")
            if not any(sb[b].requires_grad for b in self._blocks) and s.requires_grad:
                raise RuntimeError(
                    "SquareHead's block outputs are outside the autograd graph: reentrant gradient checkpointing runs "
                    "blocks under no_grad; use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False})"
                )
            out["squarehead"] = squarehead_loss([sb[b] for b in self._blocks], [tb[b] for b in self._blocks])
        return out

    def loss(self, task_loss: Tensor) -> Tensor:
        """``task_weight · task_loss`` plus the weighted distillation terms of this step; logs each term
        (``distill/task``, ``distill/kd``, ``distill/squarehead``). Ends the step's capture. Before the
        first round, while the default teacher follows the dense student, ``task_loss`` unchanged."""
        self._loss_calls += 1
        self._epoch_loss_calls += 1
        if self._tracking:
            self._reset()
            return task_loss
        try:
            terms = self.terms()
        finally:
            self._active, self._in_student = False, False
        captured, self._captured = self._captured, {}
        del captured
        total = self.task_weight * task_loss
        if "kd" in terms:
            total = total + self.kd_weight * terms["kd"]
        if "squarehead" in terms:
            total = total + self.squarehead_weight * terms["squarehead"]
        module = self._module
        if module is not None and module._trainer is not None:
            values = {"distill/task": task_loss.detach(), **{f"distill/{k}": v.detach() for k, v in terms.items()}}
            module.log_dict(values, on_step=True, on_epoch=False)
        self.last_terms = {"task": task_loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        return total

    # ================================================================ cleanup
    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._remove_hooks()
        self._unwrap()
        self._reset()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._unwrap()
        self._reset()
