"""Recovery by distillation from the dense teacher, beside any pruner in ``Trainer.fit``: the Lightning adapter
over :mod:`lightning_prune.distill` (the losses, the blocks, the capture of a step's forwards, the teacher).

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

The teacher is held by this callback, not by the LightningModule: it is in neither
``configure_optimizers``' ``self.parameters()``, the checkpoint's ``state_dict``, nor DDP's gradient
buckets; it runs in eval mode under ``torch.no_grad``, optionally in ``teacher_dtype``; under FSDP2 it
is sharded like the student (:mod:`lightning_prune.distill.teacher`: how, and why the default teacher's
structure is copied at ``setup``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.distill.blocks import find_feature_blocks, pair_block
from lightning_prune.distill.capture import Capture
from lightning_prune.distill.losses import kd_loss, output_logits, squarehead_loss
from lightning_prune.distill.teacher import (
    TeacherSource,
    check_separate,
    check_teacher_arg,
    describe,
    follow_student,
    resolve_teacher_dtype,
    shard_like,
)

# with the callback, the functions this module held before the split (now in lightning_prune.distill) stay
# importable from it
__all__ = [
    "Distillation",
    "find_feature_blocks",
    "kd_loss",
    "output_logits",
    "pair_block",
    "shard_like",
    "squarehead_loss",
]


def _check_arguments(
    teacher: Any,
    kd_weight: Any,
    temperature: Any,
    task_weight: Any,
    squarehead_weight: Any,
    squarehead_blocks: Any,
    student: Any,
) -> None:
    """Refuse a bad argument of :class:`Distillation` (its own, in its order), naming it."""
    weights = {"kd_weight": kd_weight, "task_weight": task_weight, "squarehead_weight": squarehead_weight}
    for arg, value in weights.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    if kd_weight == 0 and squarehead_weight == 0:
        raise ValueError("`kd_weight` and `squarehead_weight` are both 0: Distillation would add nothing")
    check_teacher_arg(teacher)
    if not isinstance(squarehead_blocks, str) or not squarehead_blocks:
        raise ValueError(f"`squarehead_blocks` must be 'auto' or a glob, got {squarehead_blocks!r}")
    if student is not None and not isinstance(student, str):
        raise ValueError(f"`student` must be None or a submodule name, got {student!r}")


def _student(pl_module: pl.LightningModule, name: str | None) -> tuple[str, nn.Module]:
    """The student module's name in ``pl_module`` and the module: ``name`` (refused if it is not a submodule),
    else the one child holding every trainable parameter, else ``("", pl_module)``."""
    if name is not None:
        try:
            return name, pl_module.get_submodule(name)
        except AttributeError:
            tops = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"`student={name!r}` is not a submodule of {type(pl_module).__name__} (children: {tops})"
            ) from None
    trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
    for child_name, child in pl_module.named_children():
        if trainable and trainable <= {id(p) for p in child.parameters()}:
            return child_name, child
    return "", pl_module


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
            (a module passed is sharded in place; :mod:`lightning_prune.distill.teacher`).
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
        _check_arguments(teacher, kd_weight, temperature, task_weight, squarehead_weight, squarehead_blocks, student)
        self._source = TeacherSource(teacher, resolve_teacher_dtype(teacher_dtype))
        self.kd_weight, self.temperature, self.task_weight = float(kd_weight), float(temperature), float(task_weight)
        self.squarehead_weight, self.squarehead_blocks = float(squarehead_weight), squarehead_blocks
        self.student_name, self.wrap_training_step = student, wrap_training_step
        self.teacher: nn.Module | None = None
        self._student: nn.Module | None = None
        self._capture = Capture()
        self._wrapped: pl.LightningModule | None = None
        self._module: pl.LightningModule | None = None  # logs the terms
        self._pruners: list[PruningCallback] = []
        self._tracking = False  # the default teacher follows the student until a pruner's first round
        self._followed = False  # the tracking teacher has copied the student at least once in this fit
        self._frozen = False  # the teacher is fixed (after the first round, or given)
        self.last_terms: dict[str, Tensor] = {}  # the last step's terms, detached
        self._loss_calls = 0  # calls of loss() in the current training batch (checked without the wrapper)
        self._epoch_loss_calls = 0  # and in the current epoch (manual optimization: steps return nothing)

    @property
    def teacher_dtype(self) -> torch.dtype | None:
        """The floating dtype the teacher is cast to (``None``: its own)."""
        return self._source.dtype

    # ================================================================ setup: the student, the wrapper
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        name, student = _student(pl_module, self.student_name)  # fails now on a bad `student`
        found = list(getattr(trainer, "callbacks", []))
        if self._source.arg is None and not any(isinstance(cb, PruningCallback) for cb in found):
            callbacks = [type(cb).__name__ for cb in found]
            raise ValueError(
                "Distillation(teacher=None) distils from the dense model as it is just before the pruners' first "
                f"round, and this Trainer has no pruning callback (callbacks: {callbacks}): it would only pull the "
                "model back to its weights at fit start. Add a pruner to the callbacks "
                "(OBSPruning(...), SparseGPT(...), ...), or pass the `teacher` (a dense nn.Module or its checkpoint "
                "path; copy.deepcopy of the model to keep it near its starting weights)"
            )
        if isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy):  # FSDP2: before configure_model
            self._source.keep_structure(pl_module, student)
        if not self.wrap_training_step:
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "Distillation(wrap_training_step=True) adds its term to the loss training_step returns, which manual "
                "optimization backpropagates itself: pass wrap_training_step=False and add "
                "distillation.loss(task_loss) before your manual_backward"
            )
        self._wrap(pl_module)

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if "training_step" in vars(pl_module):
            raise ValueError(
                f"{type(pl_module).__name__}.training_step is already replaced on the instance "
                "(another Distillation?): one Distillation per fit"
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
                self._capture.reset()
                raise
            if out is None:  # the user skipped this batch
                self._capture.reset()
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
        name, student = _student(pl_module, self.student_name)
        self._module = pl_module
        # a second fit of the same model keeps the teacher of the first (the model is pruned by now)
        reuse = self.teacher is not None and self._student is student
        self._student = student
        teacher = self.teacher if reuse else self._source.build(pl_module, student, name, pl_module.device)
        assert teacher is not None
        self._source.freeze(teacher, student, pl_module.device)
        # the default teacher follows the dense student until the first round, if rounds are to come
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]  # type: ignore[attr-defined]
        self._tracking = (
            self._source.arg is None and not self._frozen and bool(pruners) and not any(p.history for p in pruners)
        )
        self._pruners = pruners
        self._followed = False
        if not self._tracking:
            self._frozen = True
        check_separate(teacher, student)
        self.teacher = teacher
        blocks = find_feature_blocks(student, self.squarehead_blocks) if self.squarehead_weight else []
        teacher_blocks = [pair_block(b, teacher, self.squarehead_blocks) for b in blocks]
        self._capture.attach(student, teacher, blocks, teacher_blocks, self.teacher_dtype)
        rank_zero_info(
            f"[lightning-prune] Distillation teacher: {describe(teacher, pl_module.global_rank)}, "
            f"{len(blocks)} SquareHead blocks"
        )

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
        follow_student(self.teacher, self._student)
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

    # ================================================================ the loss
    def begin(self) -> None:
        """Start capturing the student's next forward (the wrapper calls this; with
        ``wrap_training_step=False``, call it at the start of ``training_step``)."""
        if self.teacher is None:
            raise RuntimeError("Distillation has no teacher yet: it is built at fit start (on_fit_start)")
        self._capture.start(active=not self._tracking)  # still dense: nothing to distil, the teacher is not run

    def terms(self) -> dict[str, Tensor]:
        """The distillation terms of the student forward captured since :meth:`begin`:
        ``{"kd": ..., "squarehead": ...}`` (each present when its weight is not 0)."""
        return self._capture.terms(self.kd_weight, self.temperature, self.squarehead_weight)

    def loss(self, task_loss: Tensor) -> Tensor:
        """``task_weight · task_loss`` plus the weighted distillation terms of this step; logs each term
        (``distill/task``, ``distill/kd``, ``distill/squarehead``) and the teacher's own loss on the batch where
        its output has one (``distill/teacher``: a Hugging Face model given the labels). Ends the step's capture.
        Before the first round, while the default teacher follows the dense student, ``task_loss`` unchanged."""
        self._loss_calls += 1
        self._epoch_loss_calls += 1
        if self._tracking:
            self._capture.reset()
            return task_loss
        try:
            terms = self.terms()
        finally:
            self._capture.stop()
        teacher_loss = self._capture.captured.get("teacher_loss")  # the teacher's task loss, where it computed one
        self._capture.reset()  # the captured outputs (and the graph they hold) are freed now
        total = self.task_weight * task_loss
        if "kd" in terms:
            total = total + self.kd_weight * terms["kd"]
        if "squarehead" in terms:
            total = total + self.squarehead_weight * terms["squarehead"]
        module = self._module
        if module is not None and module._trainer is not None:
            values = {"distill/task": task_loss.detach(), **{f"distill/{k}": v.detach() for k, v in terms.items()}}
            if teacher_loss is not None:
                values["distill/teacher"] = teacher_loss
            module.log_dict(values, on_step=True, on_epoch=False)
        self.last_terms = {"task": task_loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        return total

    # ================================================================ cleanup
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._cleanup()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        """The hooks off, ``training_step`` back to the class's, nothing captured."""
        self._capture.remove()
        self._unwrap()
        self._capture.reset()
