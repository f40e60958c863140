"""Distillation's loss terms: logit KD at a temperature, SquareHead's normalised feature MSE, and the logits
read from a model's output. Pure functions of tensors, computed in float32 whatever the inputs' dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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
