"""The distillation objective of a causal LM, shared by ``kdplug distill`` and the HF trainer.

Alignment (Hugging Face convention): ``labels`` is ``input_ids`` with ``-100`` where no loss is
wanted, *unshifted*. Position ``i`` of the logits predicts token ``i + 1``, so the loss compares
``student_logits[:, :-1]`` and ``teacher_logits[:, :-1]`` with ``labels[:, 1:]``; the last
position of every sequence predicts nothing and is dropped. The same target mask selects the
tokens of the KD term and of the cross-entropy term.

    loss = kd_ratio * KD(teacher || student) + (1 - kd_ratio) * CE(student, labels)

Normalisation: with ``num_tokens`` (the number of target tokens of the *whole* optimizer step,
over every micro-batch and, when the caller says so, every rank) both terms are sums divided by
that count, so gradient accumulation gives the gradient of one big batch. A method whose
reduction is ``"sequence"`` or ``"batchmean"`` (distillm2) is divided by ``num_sequences``
instead. Without counts each term is the micro-batch's own mean.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def shifted_kd_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                  labels: torch.Tensor, loss_fn, *, kd_ratio: float, ignore_index: int = -100,
                  num_tokens: int | torch.Tensor | None = None,
                  num_sequences: int | torch.Tensor | None = None,
                  extra: dict[str, Any] | None = None):
    """Return ``(loss, kd, ce)``; ``kd``/``ce`` are detached (``None`` when their weight is 0)."""
    if student_logits.dim() != 3:
        raise ValueError(f"kdplug: student logits must be [batch, length, vocab], got {tuple(student_logits.shape)}")
    if tuple(labels.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"kdplug: labels {tuple(labels.shape)} must match the logits' [batch, length] "
                         f"{tuple(student_logits.shape[:2])}")
    s = student_logits[:, :-1]
    y = labels[:, 1:].to(s.device)
    mask = y != ignore_index
    loss = s.new_zeros((), dtype=torch.float32)
    kd = ce = None
    if kd_ratio > 0:
        if teacher_logits is None:
            raise ValueError("kdplug: kd_ratio > 0 needs teacher logits")
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"kdplug: vocabulary sizes differ: the student's logits have V={student_logits.shape[-1]}, "
                             f"the teacher's V={teacher_logits.shape[-1]}; teacher and student must share a "
                             "tokenizer and vocabulary (pad or truncate one of them)")
        t = teacher_logits[:, :-1].to(s.device)
        reduction = getattr(loss_fn, "reduction", "mean")
        count = {"mean": num_tokens, "sequence": num_sequences, "batchmean": num_sequences}.get(reduction)
        kd_full = loss_fn(s, t, mask=mask, num_items=count, **(extra or {}))
        loss = loss + kd_ratio * kd_full
        kd = kd_full.detach()
    if kd_ratio < 1:
        nll = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), y.reshape(-1), ignore_index=ignore_index,
                              reduction="sum")
        denominator = num_tokens if num_tokens is not None else mask.sum()
        denominator = torch.as_tensor(denominator, device=nll.device).to(nll.dtype).clamp_min(1)
        ce_full = nll / denominator
        loss = loss + (1 - kd_ratio) * ce_full
        ce = ce_full.detach()
    return loss, kd, ce


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """``(target tokens, sequences)`` of one batch under the shift above."""
    return int((labels[:, 1:] != ignore_index).sum()), int(labels.shape[0])
