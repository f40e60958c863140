"""One training step's forwards, captured by hooks: the student module's logits (and attention mask), the
teacher run on the very arguments the student got, and both models' SquareHead block outputs; then the step's
distillation terms. Only forwards between :meth:`Capture.start` and the terms are captured, so validation and a
pruner's calibration passes see nothing."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.distill.blocks import block_hidden
from lightning_prune.distill.losses import kd_loss, output_logits, squarehead_loss


class Capture:
    """The hooks on the student module, the teacher and their SquareHead blocks, and what they saw this step."""

    def __init__(self) -> None:
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.teacher_dtype: torch.dtype | None = None
        self.blocks: list[str] = []  # SquareHead's blocks in the student module
        self.teacher_blocks: list[str] = []  # the same blocks in the teacher
        self._hooks: list[Any] = []
        self.active = False  # inside the wrapped training_step (or between begin() and loss()), training mode
        self.in_student = False  # inside the student's forward (block hooks only capture then)
        self.captured: dict[str, Any] = {}

    def attach(
        self,
        student: nn.Module,
        teacher: nn.Module,
        blocks: list[str],
        teacher_blocks: list[str],
        teacher_dtype: torch.dtype | None,
    ) -> None:
        """Hook ``student`` and ``teacher`` (and each pair of blocks, both captured under the student's block name)."""
        self.remove()
        self.student, self.teacher, self.teacher_dtype = student, teacher, teacher_dtype
        self.blocks, self.teacher_blocks = blocks, teacher_blocks
        self._hooks.append(student.register_forward_pre_hook(self._student_pre, with_kwargs=True))
        self._hooks.append(student.register_forward_hook(self._student_post, with_kwargs=True))
        for b, tb in zip(blocks, teacher_blocks):
            for who, model, name in (("student", student, b), ("teacher", teacher, tb)):
                hook = functools.partial(self._block, who, b)
                self._hooks.append(model.get_submodule(name).register_forward_hook(hook))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def start(self, active: bool) -> None:
        """Forget the last step; capture the next student forward if ``active``."""
        self.reset()
        self.active = active

    def stop(self) -> None:
        self.active, self.in_student = False, False

    def reset(self) -> None:
        self.active, self.in_student, self.captured = False, False, {}

    def _student_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.active:
            if "student" in self.captured:
                raise RuntimeError(
                    "Distillation pairs one forward of the student with the loss, and training_step called "
                    f"{type(module).__name__} twice: name the module called once per step with student='...'"
                )
            self.in_student = True

    def _student_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not (self.active and self.in_student):
            return
        self.in_student = False
        self.captured["student"] = output_logits(out)
        assert self.teacher is not None
        t_args, t_kwargs = args, kwargs
        if (dtype := self.teacher_dtype) is not None:  # floating inputs (a classifier's features) in its dtype

            def cast(v: Any) -> Any:
                return v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v

            t_args, t_kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        with torch.no_grad():
            t_out = self.teacher(*t_args, **t_kwargs)
        self.captured["teacher"] = output_logits(t_out).detach()
        if isinstance(t_loss := getattr(t_out, "loss", None), Tensor):  # labels passed: the teacher's own loss, free
            self.captured["teacher_loss"] = t_loss.detach()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.shape == self.captured["student"].shape[:-1]:
            self.captured["mask"] = mask

    def _block(self, who: str, name: str, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.active and (self.in_student or who == "teacher"):
            self.captured.setdefault(who + "_blocks", {})[name] = block_hidden(out)

    def terms(self, kd_weight: float, temperature: float, squarehead_weight: float) -> dict[str, Tensor]:
        """``{"kd": ..., "squarehead": ...}`` of the captured forward, each present when its weight is not 0."""
        if "student" not in self.captured:
            raise RuntimeError(
                f"Distillation saw no forward of the student ({type(self.student).__name__}) in this training_step: "
                "name the module training_step calls with student='...' ('' for the LightningModule itself)"
            )
        s, t = self.captured["student"], self.captured["teacher"]
        if s.shape != t.shape:
            raise ValueError(f"the teacher's logits {tuple(t.shape)} do not match the student's {tuple(s.shape)}")
        out: dict[str, Tensor] = {}
        if kd_weight:
            out["kd"] = kd_loss(s, t, temperature, self.captured.get("mask"))
        if squarehead_weight:
            sb, tb = self.captured.get("student_blocks", {}), self.captured.get("teacher_blocks", {})
            missing = [b for b in self.blocks if b not in sb or b not in tb]
            if missing:
                raise RuntimeError(f"Distillation: SquareHead blocks {missing[:3]} did not run in this forward")
            if not any(sb[b].requires_grad for b in self.blocks) and s.requires_grad:
                raise RuntimeError(
                    "SquareHead's block outputs are outside the autograd graph: reentrant gradient checkpointing runs "
                    "blocks under no_grad; use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False})"
                )
            out["squarehead"] = squarehead_loss([sb[b] for b in self.blocks], [tb[b] for b in self.blocks])
        return out
