"""Hugging Face ``transformers`` integration: :class:`DistillationTrainer`.

>>> from kdplug.integrations.hf import DistillationTrainer
>>> trainer = DistillationTrainer(model=student, teacher_model=teacher, method="amid",
...                               method_params={"alpha": 0.3}, kd_ratio=0.5, temperature=1.0,
...                               args=TrainingArguments(...), train_dataset=ds,
...                               data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
>>> trainer.train()                                                        # doctest: +SKIP

What it does, exactly:

- **Objective**: ``kd_ratio * KD(teacher || student) + (1 - kd_ratio) * CE(student, labels)``
  where KD is any kdplug method (``kdplug list``) and CE the usual next-token cross-entropy.
- **Alignment**: batches carry ``labels`` = ``input_ids`` with ``-100`` where no loss is wanted,
  unshifted, as ``DataCollatorForLanguageModeling(mlm=False)`` makes them. Position ``i`` of the
  logits predicts token ``i + 1``: the loss compares ``logits[:, :-1]`` (student and teacher) with
  ``labels[:, 1:]``; a ``-100`` target masks that position in both terms.
- **Teacher**: kept in ``eval()`` mode and run under ``torch.no_grad()`` with the student's
  inputs (``use_cache=False`` when its ``forward`` takes it). It is moved to the training device
  unless it was dispatched with a ``device_map`` or ``teacher_device="keep"`` is given; wherever
  it lives, its logits are moved to the student's device before the loss.
- **Gradient accumulation and data parallelism are exact**: the trainer counts the target tokens
  of the whole optimizer step (all micro-batches and, with ``average_tokens_across_devices``, all
  ranks) and passes that count to kdplug as ``num_items`` and to the cross-entropy as its
  denominator, so two micro-batches of 2 give the update of one batch of 4. Methods whose
  reduction is ``"sequence"`` (distillm2) are divided by the step's sequence count instead.
- **Stateful methods** (TAID): a :class:`KDMethodCallback` calls ``loss_fn.step(loss)`` once per
  optimizer step, after the optimizer, with the step's detached KD loss (the mean over the whole
  accumulated batch, averaged across ranks by kdplug). The schedule's state is saved with every
  checkpoint (``kdplug_loss.pt``) and restored by ``train(resume_from_checkpoint=...)``.
- **Vocabularies** must match: a teacher and student with different vocabulary sizes are
  rejected with both sizes in the message.
- **distillm2** reads an optional per-sequence bool ``student_generated`` from the batch (default:
  all ``False``, i.e. the data was written by the teacher or a human).

Nothing is monkey-patched: it is a subclass using ``compute_loss``, ``get_batch_samples``, ``log``
and a callback. Not handled: FSDP/ZeRO-3 sharding of the teacher (it is an unwrapped module),
sequence/context parallelism, and teacher-student vocabulary mapping.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("kdplug.integrations.hf needs Hugging Face transformers: "
                      "pip install 'kdplug[train]' (or pip install transformers accelerate)") from exc

import kdplug
from kdplug._distill_loss import count_targets, shifted_kd_ce
from kdplug.loss import KDLoss

__all__ = ["DistillationTrainer", "KDMethodCallback", "build_kd_loss"]

STATE_FILE = "kdplug_loss.pt"


def build_kd_loss(method: str | KDLoss = "fkl", method_params: Mapping[str, Any] | None = None,
                  temperature: float | None = None) -> KDLoss:
    """A ``KDLoss`` from a method name and parameters, or the given ``KDLoss`` unchanged."""
    if isinstance(method, KDLoss):
        if method_params:
            raise ValueError("DistillationTrainer: method is already a KDLoss; pass its parameters to "
                             "kdplug.get(...) instead of method_params")
        if temperature is not None and float(temperature) != method.temperature:
            raise ValueError(f"DistillationTrainer: temperature={temperature} conflicts with the KDLoss's "
                             f"temperature={method.temperature}; set it in kdplug.get(...)")
        return method
    if not isinstance(method, str):
        raise TypeError(f"DistillationTrainer: method must be a method name or a kdplug.KDLoss, got "
                        f"{type(method).__name__}")
    return kdplug.get(method, temperature=1.0 if temperature is None else temperature, **dict(method_params or {}))


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_vocab(student: nn.Module, teacher: nn.Module) -> None:
    vs, vt = _vocab_size(student), _vocab_size(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise ValueError(f"DistillationTrainer: the teacher's vocabulary has {vt} entries but the student's has "
                         f"{vs}; kdplug compares the two distributions entry by entry, so teacher and student "
                         "must share a tokenizer and vocabulary size (resize the student's embeddings with "
                         f"student.resize_token_embeddings({vt}) if only padding differs)")


class KDMethodCallback(TrainerCallback):
    """Steps the method's schedule once per optimizer step and saves its state with checkpoints."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.kd_loss.schedule is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(trainer.kd_loss.state_dict(), os.path.join(folder, STATE_FILE))


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills ``teacher_model`` into ``model`` with a kdplug method.

    Args (besides the usual ``Trainer`` ones, which pass through):
        teacher_model: the teacher, a causal LM returning ``.logits`` of the student's vocabulary.
        method: a kdplug method name (``"fkl"``, ``"taid"``, ``"amid"``, ...) or a ``kdplug.KDLoss``.
        method_params: the method's parameters when ``method`` is a name (``{"alpha": 0.3}``).
        kd_ratio: weight of the KD term; ``1 - kd_ratio`` weighs the hard-label cross-entropy
            (``1.0``, the default, is pure distillation; ``0.0`` is plain fine-tuning).
        temperature: divides both logit vectors in the KD term (default 1.0; no T² scaling unless
            the KDLoss was built with ``t2_scale=True``). The CE term is always at T = 1.
        teacher_device: ``None`` (the training device, unless the teacher has an ``hf_device_map``),
            ``"keep"`` (never move it), or a device.
        ignore_index: the label value that masks a position (default -100).

    The KD loss module is ``trainer.kd_loss`` (TAID's interpolation: ``trainer.kd_loss.t``).
    """

    def __init__(self, *args: Any, teacher_model: nn.Module, method: str | KDLoss = "fkl",
                 method_params: Mapping[str, Any] | None = None, kd_ratio: float = 1.0,
                 temperature: float | None = None, teacher_device: str | torch.device | None = None,
                 ignore_index: int = -100, **kwargs: Any):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; compute_loss_func cannot be used with it")
        if teacher_model is None or not isinstance(teacher_model, nn.Module):
            raise TypeError("DistillationTrainer: teacher_model must be a torch.nn.Module (a causal LM)")
        if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)) or not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"DistillationTrainer: kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
        kd_loss = build_kd_loss(method, method_params, temperature)
        if kd_loss.reduction == "none":
            raise ValueError("DistillationTrainer: the KD loss must reduce to a scalar; reduction='none' is not "
                             "usable here (use 'mean', 'sequence', 'batchmean' or 'sum')")
        student = kwargs.get("model", args[0] if args else None)
        if student is not None:
            _check_vocab(student, teacher_model)
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model
        self.kd_loss = kd_loss
        self.kd_ratio = float(kd_ratio)
        self.ignore_index = ignore_index
        if teacher_device is None:
            if getattr(teacher_model, "hf_device_map", None) is None:
                self.teacher.to(self.args.device)
        elif not (isinstance(teacher_device, str) and teacher_device == "keep"):
            self.teacher.to(teacher_device)
        self.teacher.eval()
        try:
            import inspect
            self._teacher_takes_use_cache = "use_cache" in inspect.signature(self.teacher.forward).parameters
        except (TypeError, ValueError):
            self._teacher_takes_use_cache = False
        # compute_loss returns a loss already normalised over the whole accumulated batch whenever
        # the step's target count is known (it always is: labels are required); these two
        # attributes tell Trainer (newer and older releases respectively) not to divide it again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._num_sequences_in_batch: torch.Tensor | None = None
        self._step_kd = 0.0          # this optimizer step's KD loss (sum over micro-batches)
        self._log_sums = {"kd_loss": 0.0, "ce_loss": 0.0}
        self._log_steps = 0
        self._step_ce = 0.0
        self.add_callback(KDMethodCallback(self))

    # ------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The optimizer step's micro-batches and its target-token count (labels shifted by one),
        summed over ranks when ``args.average_tokens_across_devices`` is on."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        tokens = sequences = 0
        for batch in batch_samples:
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            if not isinstance(labels, torch.Tensor):
                self._num_sequences_in_batch = None
                return batch_samples, None
            t, s = count_targets(labels, self.ignore_index)
            tokens, sequences = tokens + t, sequences + s
        counts = torch.tensor([tokens, sequences], dtype=torch.int64, device=self.args.device)
        if self._counts_are_global():
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)
        self._num_sequences_in_batch = counts[1]
        return batch_samples, counts[0]

    def _counts_are_global(self) -> bool:
        return bool(getattr(self.args, "average_tokens_across_devices", False)) and self.args.world_size > 1

    def _teacher_logits(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.teacher.training:
            self.teacher.eval()
        device = next(self.teacher.parameters()).device
        teacher_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if self._teacher_takes_use_cache:
            teacher_inputs["use_cache"] = False
        with torch.no_grad():
            out = self.teacher(**teacher_inputs)
        return out.logits if hasattr(out, "logits") else out[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("DistillationTrainer: every batch needs `labels` (input_ids with -100 where no loss "
                             "is wanted, unshifted); DataCollatorForLanguageModeling(tokenizer, mlm=False) makes them")
        extra = {}
        student_generated = inputs.pop("student_generated", None)
        if self.kd_loss.recipe is not None and getattr(self.kd_loss.recipe, "by", None) == "student_generated":
            if student_generated is None:
                student_generated = torch.zeros(labels.shape[0], dtype=torch.bool)
            extra["student_generated"] = student_generated
        outputs = model(**inputs)
        student_logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        teacher_logits = None
        if self.kd_ratio > 0:
            teacher_logits = self._teacher_logits(inputs)
            if teacher_logits.shape[-1] != student_logits.shape[-1]:
                raise ValueError(f"DistillationTrainer: the teacher's logits have {teacher_logits.shape[-1]} "
                                 f"vocabulary entries but the student's have {student_logits.shape[-1]}; teacher "
                                 "and student must share a tokenizer and vocabulary size")
            teacher_logits = teacher_logits.to(student_logits.device)
        training = model.training and num_items_in_batch is not None
        scale = 1
        if training:
            num_tokens, num_sequences = num_items_in_batch, self._num_sequences_in_batch
            if self._counts_are_global():
                # DDP averages gradients over ranks; each rank's share of the global sum is
                # multiplied back by the world size (as Trainer does for its own loss).
                scale = self.accelerator.num_processes
        else:
            num_tokens = num_sequences = None  # evaluation: each batch's own mean
        loss, kd, ce = shifted_kd_ce(student_logits, teacher_logits, labels, self.kd_loss, kd_ratio=self.kd_ratio,
                                     ignore_index=self.ignore_index, num_tokens=num_tokens,
                                     num_sequences=num_sequences, extra=extra)
        if scale != 1:
            loss = loss * scale
        if model.training:
            factor = scale if training else 1.0 / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            if kd is not None:
                self._step_kd = self._step_kd + kd * factor
            if ce is not None:
                self._step_ce = self._step_ce + ce * factor
        return (loss, outputs) if return_outputs else loss

    def _end_optimizer_step(self) -> None:
        """Called once per optimizer step by :class:`KDMethodCallback`."""
        step_kd = self._step_kd
        if self.kd_ratio > 0 and isinstance(step_kd, torch.Tensor):
            self.kd_loss.step(step_kd)  # averaged across ranks inside kdplug
        self._log_sums["kd_loss"] += float(step_kd)
        self._log_sums["ce_loss"] += float(self._step_ce)
        self._log_steps += 1
        self._step_kd = 0.0
        self._step_ce = 0.0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._log_steps:
            if self.kd_ratio > 0:
                logs["kd_loss"] = self._log_sums["kd_loss"] / self._log_steps
            if self.kd_ratio < 1:
                logs["ce_loss"] = self._log_sums["ce_loss"] / self._log_steps
            if self.kd_loss.schedule is not None:
                for name, value in self.kd_loss.schedule.value().items():
                    logs[f"{self.kd_loss.method.name}_{name}"] = float(value)
            self._log_sums = {"kd_loss": 0.0, "ce_loss": 0.0}
            self._log_steps = 0
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint and self.kd_loss.schedule is not None:
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint
                folder = get_last_checkpoint(self.args.output_dir)
            path = os.path.join(folder, STATE_FILE) if isinstance(folder, str) else None
            if path and os.path.isfile(path):
                self.kd_loss.load_state_dict(torch.load(path, map_location="cpu"))
        return super().train(resume_from_checkpoint, *args, **kwargs)
