"""``KDLoss``: masks, temperature, reductions and state around one method."""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import nn

from . import _extension, _ops, _topk, _torch_impl
from ._topk import TopK
from ._pack import params_tensor, structure_and_consts
from ._registry import REGISTRY
from .spec import HeadTailWeights, Method, Recipe, Schedule, Split

REDUCTIONS = ("mean", "sum", "none", "batchmean", "sequence")
# Rows per call of a Recipe's token_weights: 2 MiB of fp32 log-probs, so that the weights' passes
# over a block (AKL: about twenty, in float64) run in cache, not from memory.
_WEIGHT_BLOCK_BYTES = 2 << 20
INF_POLICIES = ("exact", "exclude")
BACKENDS = ("auto", "compiled", "torch")
VOCAB_ALIGN = (None, "truncate", "pad")


def get(name: str, *, temperature: float = 1.0, reduction: str | None = None, t2_scale: bool = False,
        inf_policy: str = "exact", backend: str = "auto", vocab_align: str | None = None,
        process_group: Any = None, inplace_backward: bool = False, **method_params: Any) -> KDLoss:
    """Build the loss module for a registered method.

    Args:
        name: a method name or alias (``kdplug list`` shows them).
        temperature: divides both logit vectors (> 0).
        reduction: ``"mean"`` (over unmasked tokens; the default), ``"sum"``, ``"none"`` (per
            token, the logits' leading shape, masked tokens 0), ``"batchmean"`` (sum over the
            first dimension's size), ``"sequence"`` (each sequence's token mean, then the mean
            over sequences). ``None`` takes the method's default (``"sequence"`` for distillm2),
            else ``"mean"``.
        t2_scale: multiply the loss by ``temperature ** 2`` (Hinton's scaling; off by default).
        inf_policy: ``"exact"`` (zero probabilities follow the exact limits) or ``"exclude"``
            (DistiLLM's masking: a vocabulary entry where either logit is infinite is dropped).
        backend: ``"auto"`` (compiled core when it can run, else PyTorch), ``"compiled"``
            (raise if it cannot run) or ``"torch"``.
        vocab_align: what to do when the two vocabularies differ in size (padded vocabularies,
            e.g. 151936 vs 152064): ``None`` raises naming both sizes; ``"truncate"`` drops the
            larger one's extra columns; ``"pad"`` pads the smaller one with ``-inf`` columns
            (probability 0, never zeros).
        process_group: vocabulary parallelism: each rank of this ``torch.distributed`` group
            passes its shard (columns) of both logits, ``[..., V_rank]``, in rank order; the loss
            is that of the whole vocabulary (on every rank) and each rank gets its shard's
            gradient. Every rank must make the same call (tokens, mask, reduction).
        inplace_backward: the backward writes the gradient w.r.t. the student logits over the
            student logits themselves (no N x V gradient allocation on the CPU kernel). Only for
            logits nothing else reads afterwards (autograd's version check raises if something
            does); not with a Split method (distillm2), which evaluates the rows twice.
        **method_params: the method's own parameters (``kdplug list`` shows them).
    """
    method = REGISTRY.lookup(name)
    return KDLoss(method, temperature=temperature, reduction=reduction, t2_scale=t2_scale,
                  inf_policy=inf_policy, backend=backend, vocab_align=vocab_align, process_group=process_group,
                  inplace_backward=inplace_backward, **method_params)


def _bind(method: Method, params: dict[str, Any]) -> dict[str, Any]:
    accepted = method.parameters()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k
                           for k, v in accepted.items()) or "none"
        raise TypeError(f"kdplug.get({method.name!r}): unknown parameter(s) {', '.join(unknown)}; "
                        f"{method.name} accepts: {listed}")
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in params]
    if missing:
        raise TypeError(f"kdplug.get({method.name!r}): missing required parameter(s) {', '.join(missing)}")
    bound = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
    bound.update(params)
    return bound


class KDLoss(nn.Module):
    """A distillation loss over logits ``[..., V]``; build it with :func:`kdplug.get`.

    Call it as ``loss_fn(student_logits, teacher_logits, mask=None, labels=None,
    ignore_index=-100, num_items=None)``. Logits must already be aligned (position i of both
    predicts the same token). ``mask`` (bool, the leading shape) or ``labels`` (tokens equal to
    ``ignore_index`` are masked) selects the tokens; masked tokens are never read, give 0 and get
    a zero gradient. ``num_items`` replaces the denominator of ``"mean"`` (token count),
    ``"batchmean"`` and ``"sequence"`` (sequence count): pass the global count so that gradient
    accumulation and data parallelism give the gradient of the one big batch.

    ``log_ratio_at=ids`` (integer token ids, the leading shape) also returns, from the same pass,
    ``log p(id) - log q(id)`` per token at the loss's temperature (teacher minus student; detached,
    0 on masked tokens): the per-token reward of MiniLLM-style on-policy training. The call then
    returns ``(loss, log_ratio)``.
    """

    def __init__(self, method: Method, *, temperature: float = 1.0, reduction: str | None = None,
                 t2_scale: bool = False, inf_policy: str = "exact", backend: str = "auto",
                 vocab_align: str | None = None, process_group: Any = None, inplace_backward: bool = False,
                 **method_params: Any):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"kdplug.get: temperature must be a finite number > 0, got {temperature!r}")
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f"kdplug.get: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if inf_policy not in INF_POLICIES:
            raise ValueError(f"kdplug.get: inf_policy must be one of {INF_POLICIES}, got {inf_policy!r}")
        if backend not in BACKENDS:
            raise ValueError(f"kdplug.get: backend must be one of {BACKENDS}, got {backend!r}")
        if vocab_align not in VOCAB_ALIGN:
            raise ValueError(f"kdplug.get: vocab_align must be one of {VOCAB_ALIGN}, got {vocab_align!r}")
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"kdplug.get: inplace_backward must be a bool, got {inplace_backward!r}")
        if not isinstance(t2_scale, bool):
            raise TypeError(f"kdplug.get: t2_scale must be a bool, got {t2_scale!r}")
        if process_group is not None and vocab_align is not None:
            raise ValueError("kdplug.get: vocab_align does not apply with process_group (each rank holds a "
                             "shard of one vocabulary)")
        self.vocab_align = vocab_align
        self.process_group = process_group
        self.inplace_backward = inplace_backward
        self.method = method
        self.params = _bind(method, method_params)
        self.temperature = float(temperature)
        self.t2_scale = t2_scale
        self.inf_policy = inf_policy
        self.backend = backend
        built = method.build(**self.params) if method.build is not None else None
        if built is not None and not isinstance(built, (Recipe, Split)):
            raise TypeError(f"method {method.name!r}: build() returned {type(built).__name__}, "
                            "expected a kdplug.Recipe or kdplug.Split")
        self.recipe = built
        if inplace_backward and isinstance(built, Split):
            raise ValueError(f"kdplug.get: inplace_backward=True does not apply to {method.name!r}: its Split "
                             "evaluates the same student rows twice, and the first gradient written would be "
                             "read as logits by the second")
        if process_group is not None and built is None:
            raise ValueError(f"kdplug.get: process_group needs a method with a Recipe; {method.name!r} is defined "
                             "by torch_loss only")
        default_reduction = built.reduction if isinstance(built, Split) else None
        self.reduction = reduction or default_reduction or "mean"
        self.schedule: Schedule | None = None
        if method.schedule is not None:
            schedule = method.schedule(**self.params)
            if not isinstance(schedule, Schedule):
                raise TypeError(f"method {method.name!r}: schedule() must return a kdplug.Schedule")
            self.schedule = schedule
        self._static = {}
        for recipe in self._recipes():
            self._static[id(recipe)] = structure_and_consts(recipe, inf_policy)
        if backend == "compiled":
            if method.build is None:
                raise RuntimeError(f"kdplug: backend='compiled' was requested but method "
                                   f"{method.name!r} has no Recipe (it is defined by torch_loss only)")
            _extension.assert_has_ops()

    # ----------------------------------------------------------------------------------------
    def _recipes(self) -> list[Recipe]:
        if isinstance(self.recipe, Split):
            return [self.recipe.if_false, self.recipe.if_true]
        return [self.recipe] if self.recipe is not None else []

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (f"{self.method.name}({params}), temperature={self.temperature}, reduction={self.reduction!r}, "
                f"inf_policy={self.inf_policy!r}, t2_scale={self.t2_scale}, backend={self.backend!r}")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            schedule = self.__dict__.get("_modules", {}).get("schedule")
            if schedule is not None:
                values = schedule.value()
                if name in values:
                    return float(values[name])
            raise

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Advance the method's schedule once per optimizer step (a no-op for stateless methods).

        Pass the step's (detached) loss; it is averaged across ranks when torch.distributed is
        initialized, so every rank holds the same state.
        """
        if self.schedule is not None:
            self.schedule.step(loss)

    # ----------------------------------------------------------------------------------------
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ignore_index: int = -100, num_items: int | torch.Tensor | None = None,
                log_ratio_at: torch.Tensor | None = None, **extra: Any):
        group = self.process_group
        if _is_dtensor(student_logits) or _is_dtensor(teacher_logits):
            from ._vocab_parallel import local_shards
            student_logits, teacher_logits, group = local_shards(student_logits, teacher_logits, group)
        if isinstance(teacher_logits, TopK):
            if group is not None or log_ratio_at is not None:
                raise ValueError("kdplug: a TopK teacher does not combine with process_group= or log_ratio_at= "
                                 "(the teacher's log-probabilities outside its top k are not known)")
            lead, vocab = _check_logits(student_logits, None)
            _check_topk(teacher_logits, lead)
            teacher = teacher_logits
        else:
            student_logits, teacher_logits = _align_vocab(student_logits, teacher_logits, self.vocab_align)
            lead, vocab = _check_logits(student_logits, teacher_logits)
            teacher = teacher_logits.reshape(-1, vocab)
        token_mask = _token_mask(mask, labels, ignore_index, lead, student_logits.device)
        flags = self._route_flags(extra, lead, student_logits.device)
        student_rows, row_mask = student_logits.reshape(-1, vocab), token_mask.reshape(-1)
        ids = None if log_ratio_at is None else _sampled_ids(log_ratio_at, lead, student_logits.device)
        expected = None
        if _ops.grad_in_forward(student_rows) and (num_items is None or torch.as_tensor(num_items).numel() == 1):
            expected = self._expected_grad(token_mask, num_items)
        per_token, lse = self._per_token(student_rows, teacher, row_mask, flags, group=group, expected=expected)
        loss = self._finish(_reduce(per_token.reshape(lead), token_mask, self.reduction, num_items))
        if ids is None:
            return loss
        # log p(y) - log q(y) = (t_y - s_y) / T - (LSE(t / T) - LSE(s / T)), the LSEs from the pass
        # above; +-inf where one side is 0, and 0 where both are (as an entry that both give 0).
        with torch.no_grad():
            t_y, s_y = self._logits_at(student_rows, teacher, ids.reshape(-1), row_mask, group).unbind(1)
            ratio = (t_y - s_y) / self.temperature - (lse[:, 1] - lse[:, 0]).to(t_y.dtype)
            keep = row_mask & ((t_y != float("-inf")) | (s_y != float("-inf")))
            ratio = torch.where(keep, ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
        return loss, ratio.reshape(lead)

    def _expected_grad(self, token_mask, num_items):
        """d loss / d per-token loss as this call's reduction and T² scaling make it ([N]): the
        incoming gradient the compiled core predicts when it computes the gradient in the forward
        (``kdplug._ops.recipe_loss(expected=)``; a loss scaled further costs one pass more)."""
        if self.reduction == "none":
            weights = token_mask.to(torch.float64)
        else:
            weights = _reduction_weights(token_mask, self.reduction, num_items)
        if self.t2_scale:
            weights = weights * self.temperature ** 2
        return weights.reshape(-1)

    @staticmethod
    def _logits_at(student_rows, teacher_rows, ids, row_mask, group):
        """``[t[n, ids[n]], s[n, ids[n]]]`` in float64, ``[N, 2]`` (ids index the whole vocabulary;
        under process_group the rank holding each id contributes it)."""
        width = student_rows.shape[-1]
        offset, vocab = 0, width
        if group is not None:
            from ._vocab_parallel import shard_offset
            offset, vocab = shard_offset(group, width)
        ids = torch.where(row_mask, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"kdplug: log_ratio_at holds ids outside [0, {vocab}) on unmasked tokens")
        local = ids - offset
        here = (local >= 0) & (local < width) & row_mask
        col = torch.where(here, local, torch.zeros((), dtype=local.dtype, device=local.device))[:, None]
        at = torch.cat([teacher_rows.detach().gather(1, col), student_rows.detach().gather(1, col)], 1).double()
        at = torch.where(here[:, None], at, torch.zeros((), dtype=at.dtype, device=at.device))
        if group is not None:  # one rank holds each id, the others add 0
            import torch.distributed as dist
            dist.all_reduce(at, group=group)
        return at

    def fused(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
              student_bias: torch.Tensor | None = None, *, teacher, mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, ignore_index: int = -100,
              num_items: int | torch.Tensor | None = None, chunk_size: int | None = None,
              memory_budget: int | None = None, **extra: Any) -> torch.Tensor:
        """The loss of ``student_hidden @ student_weight.T (+ student_bias)`` without the logits.

        Args:
            student_hidden: ``[..., H]``, the last hidden states (aligned with the teacher).
            student_weight: ``[V, H]``, the student's lm_head weight; ``student_bias``: ``[V]``.
            teacher: dense logits ``[..., V]``, a ``(hidden [..., H_t], weight [V, H_t][, bias])``
                tuple (the teacher's logits are then made chunk by chunk too, without gradient),
                or a :class:`kdplug.TopK`.
            chunk_size: tokens per chunk; by default as many as fit ``memory_budget`` bytes for a
                chunk's student and teacher logits (fp32; the gradient is written over the
                student's, except for a Split method, which needs a third block); the default budget is
                4% of one N x V fp32 tensor, clamped to [16 MiB, 256 MiB].
            mask, labels, ignore_index, num_items, extra: as for the unfused call.

        Returns the reduced loss (any reduction but ``"none"``), differentiable w.r.t. the hidden
        states, the weight and the bias: same result as computing the logits and calling the loss.
        """
        if self.process_group is not None:
            raise ValueError("kdplug: fused() does not take vocabulary shards (process_group=) yet; call the loss "
                             "on the sharded logits")
        if self.reduction == "none":
            raise ValueError("kdplug: fused() needs a scalar reduction (mean, sum, batchmean, sequence); "
                             "reduction='none' would keep a value per token to back-propagate")
        for name, x, dims in (("student_hidden", student_hidden, None), ("student_weight", student_weight, 2)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 \
                    or (dims is not None and x.dim() != dims):
                raise TypeError(f"kdplug: {name} must be a floating-point tensor "
                                f"{'[V, H]' if dims else '[..., H]'}")
        vocab, width = student_weight.shape
        if student_hidden.shape[-1] != width:
            raise ValueError(f"kdplug: student_hidden has H={student_hidden.shape[-1]} but student_weight is "
                             f"{tuple(student_weight.shape)} ([V, H])")
        if student_bias is not None and tuple(student_bias.shape) != (vocab,):
            raise ValueError(f"kdplug: student_bias must have shape [{vocab}], got {tuple(student_bias.shape)}")
        lead = tuple(student_hidden.shape[:-1])
        if isinstance(teacher, TopK):
            _check_topk(teacher, lead)
            teacher_rows, teacher_vocab = teacher, vocab
        elif isinstance(teacher, (tuple, list)):
            if len(teacher) not in (2, 3) or tuple(teacher[0].shape[:-1]) != lead:
                raise ValueError("kdplug: teacher=(hidden [..., H_t], weight [V_t, H_t][, bias]) with the "
                                 "student's leading shape")
            if teacher[1].dim() != 2 or teacher[1].shape[1] != teacher[0].shape[-1]:
                raise ValueError(f"kdplug: the teacher's hidden states have H_t={teacher[0].shape[-1]} but its "
                                 f"weight is {tuple(teacher[1].shape)} ([V_t, H_t])")
            if len(teacher) == 3 and teacher[2] is not None and tuple(teacher[2].shape) != (teacher[1].shape[0],):
                raise ValueError(f"kdplug: the teacher's bias must have shape [{teacher[1].shape[0]}], got "
                                 f"{tuple(teacher[2].shape)}")
            teacher_rows = (teacher[0].reshape(-1, teacher[0].shape[-1]), teacher[1],
                            teacher[2] if len(teacher) == 3 else None)
            teacher_vocab = teacher[1].shape[0]
        elif isinstance(teacher, torch.Tensor):
            if tuple(teacher.shape[:-1]) != lead:
                raise ValueError(f"kdplug: teacher logits {tuple(teacher.shape)} must have the student's "
                                 f"leading shape {lead}")
            teacher_rows, teacher_vocab = teacher.reshape(-1, teacher.shape[-1]), teacher.shape[-1]
        else:
            raise TypeError("kdplug: teacher must be logits, a (hidden, weight[, bias]) tuple or a kdplug.TopK")
        if teacher_vocab != vocab and self.vocab_align is None:
            raise ValueError(f"kdplug: vocabulary sizes differ: the student's lm_head has V={vocab}, the "
                             f"teacher's V={teacher_vocab}; pass vocab_align='truncate' or 'pad' to kdplug.get")
        token_mask = _token_mask(mask, labels, ignore_index, lead, student_hidden.device)
        flags = self._route_flags(extra, lead, student_hidden.device)
        coef = _reduction_weights(token_mask, self.reduction, num_items)
        from ._fused import FusedLMHead, chunk_rows_for
        n_rows = token_mask.numel()
        if memory_budget is None:
            memory_budget = min(256 << 20, max(16 << 20, n_rows * max(vocab, teacher_vocab) * 4 // 25))
        elif isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
            raise ValueError(f"kdplug: memory_budget must be a positive number of bytes, got {memory_budget!r}")
        buffers = 3 if flags is not None else 2  # a Split's gradient is not written in place
        chunk_rows = chunk_rows_for(memory_budget, max(vocab, teacher_vocab), buffers) if chunk_size is None \
            else chunk_size
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"kdplug: chunk_size must be a positive int, got {chunk_size!r}")
        align = functools.partial(_align_vocab, vocab_align=self.vocab_align)
        loss = FusedLMHead.apply(self, align, coef.reshape(-1), token_mask.reshape(-1), flags, teacher_rows,
                                 chunk_rows, student_hidden.reshape(-1, width), student_weight, student_bias)
        return self._finish(loss)

    def _route_flags(self, extra, lead, device):
        """The per-token route of a Split method ([N] bool, from a flag per sequence), else None."""
        flags = None
        if isinstance(self.recipe, Split):
            flags = extra.pop(self.recipe.by, None)
            if flags is None:
                raise TypeError(f"kdplug: method {self.method.name!r} needs {self.recipe.by}= "
                                f"(a bool per sequence, shape [{lead[0] if lead else 1}])")
            flags = _sequence_flags(flags, self.recipe.by, lead, device).reshape(-1)
        if extra:
            raise TypeError(f"kdplug: {self.method.name} got unexpected keyword argument(s) "
                            f"{', '.join(sorted(extra))}")
        return flags

    def _per_token(self, student_rows, teacher, row_mask, flags, inplace=None, group=None, expected=None):
        """Per-token loss [N] of student rows [N, V] against teacher rows [N, V] or a TopK, and the
        rows' [N, 2] LSE(s / T), LSE(t / T) (of the short rows for a TopK). ``inplace`` overrides
        ``inplace_backward`` (the fused lm_head's chunks are always written in place); ``group``:
        the vocabulary-parallel group of this call (``process_group``, or the DTensors' mesh)."""
        temperature = self.temperature
        if isinstance(teacher, TopK):
            # Short rows of log-probabilities at the teacher's ids (plus the tail bucket), with
            # the temperature already applied.
            student_rows, teacher = _topk.rows(student_rows, teacher, temperature, student_rows.shape[-1], row_mask)
            temperature = 1.0
        values = self.schedule.value() if self.schedule is not None else {}
        inplace = self.inplace_backward if inplace is None else inplace
        if flags is not None:
            on = row_mask & flags
            parts = [(self.recipe.if_false, row_mask & ~on), (self.recipe.if_true, on)]
        else:
            parts = [(self.recipe, row_mask)]
        return self._evaluate(parts, student_rows, teacher, temperature=temperature, values=values, inplace=inplace,
                              group=group, expected=expected)

    def _finish(self, loss):
        """T² scaling and the schedule's per-forward hook, after the reduction."""
        if self.t2_scale:
            loss = loss * (self.temperature ** 2)
        if self.schedule is not None:
            self.schedule.on_forward(loss.detach())
        return loss

    def _evaluate(self, parts, student_rows, teacher_rows, *, temperature, values, inplace, group, expected=None):
        """Per-token loss [N] and [N, 2] LSEs of ``parts``, (recipe, row mask) pairs on disjoint rows:
        one recipe, or a Split's two. ``expected``: the predicted incoming per-token gradient
        (``_expected_grad``), or None."""
        if parts[0][0] is None:  # a torch_loss-only method (never a Split)
            return self._evaluate_torch_loss(student_rows, teacher_rows, parts[0][1], temperature)
        packed = [self._packed(recipe, student_rows, teacher_rows, mask, temperature, values, group)
                  for recipe, mask in parts]
        masks = [mask for _, mask in parts]
        # The compiled core when it can run (kdplug._ops.why_cannot_run lists the conditions);
        # otherwise "auto" warns once per reason and takes the PyTorch path, "compiled" raises.
        rows = None  # the whole row is here (RecipeLoss: _torch_impl.LOCAL)
        if group is not None:
            from . import _vocab_parallel
            rows = _vocab_parallel.ShardedRows(group)
        if self.backend != "torch":
            if group is None:
                reason = _ops.why_cannot_run(student_rows, teacher_rows)
            else:
                reason = _vocab_parallel.why_cannot_run(student_rows, teacher_rows)
            if reason is None:
                if group is not None:
                    return _combine([_vocab_parallel.recipe_loss(student_rows, teacher_rows, *p, group, inplace)
                                     for p in packed], masks)
                if len(packed) > 1:  # a Split: its recipes' gradients written into one tensor
                    loss, row_stats = _ops.split_recipe_loss(student_rows, teacher_rows, packed, expected)
                else:
                    loss, row_stats = _ops.recipe_loss(student_rows, teacher_rows, *packed[0], inplace, expected)
                return loss, row_stats[:, :2]
            if self.backend == "compiled":
                raise RuntimeError(f"kdplug: backend='compiled' was requested but the compiled core cannot "
                                   f"run here: {reason}")
            # NB: every reason warns, "teacher_logits requires grad" included: the usual cause is a
            # teacher forward without torch.no_grad(), which also costs its activations' memory.
            _extension.warn_fallback(reason)
        return _combine([_torch_impl.RecipeLoss.apply(student_rows, teacher_rows, *p, rows, inplace) for p in packed],
                        masks)

    def _packed(self, recipe, student_rows, teacher_rows, row_mask, temperature, values, group):
        """What the evaluators take for one recipe: (params, token_weights, row_mask, structure, consts)."""
        structure, consts = self._static[id(recipe)]
        params = params_tensor(recipe, temperature, values, student_rows.device)
        token_weights = None
        if recipe.token_weights is not None:
            token_weights = self._token_weights(recipe, student_rows, teacher_rows, row_mask, temperature, group)
        return params, token_weights, row_mask, structure, consts

    @staticmethod
    def _log_probs(logits, row_mask, temperature, grad: bool):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits if grad else logits.detach()
        x = torch.where(row_mask[:, None], x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
        return torch.log_softmax(x / temperature, dim=-1)

    def _token_weights(self, recipe, student_rows, teacher_rows, row_mask, temperature, group):
        """The recipe's per-token term weights: from the compiled core for HeadTailWeights where it
        has a kernel, else computed on blocks of rows (``_WEIGHT_BLOCK_BYTES`` of fp32
        log-probabilities each), so that no N x V temporary exists."""
        if (isinstance(recipe.token_weights, HeadTailWeights) and self.backend != "torch" and group is None
                and _ops.has_head_tail_kernel(student_rows, teacher_rows)):
            return _ops.head_tail_weights(student_rows, teacher_rows, row_mask, temperature, recipe.token_weights)
        n, n_terms = student_rows.shape[0], len(recipe.terms)
        width = student_rows.shape[-1]
        if group is not None:
            from ._vocab_parallel import gather_columns, shard_widths
            sizes = shard_widths(group, width)  # once: every block gathers the same shards
            width = sum(sizes)
        block = max(1, _WEIGHT_BLOCK_BYTES // (4 * width))
        out = [torch.zeros(0, n_terms, dtype=torch.float64, device=student_rows.device)]
        with torch.no_grad():
            for r0 in range(0, n, block):
                rows = slice(r0, r0 + block)
                s, t = student_rows[rows].detach(), teacher_rows[rows].detach()
                if group is not None:
                    # NB: token weights are functions of whole rows (AKL's head): each block's
                    # shards are gathered (every rank walks the same blocks).
                    s, t = gather_columns(s, group, sizes), gather_columns(t, group, sizes)
                if isinstance(recipe.token_weights, HeadTailWeights):
                    # float64 log-probabilities, as precise as the compiled op's (a peaked row's
                    # top gap, p |expm1(lq - lp)|, needs lq - lp to more digits than float32 has)
                    s, t = s.double(), t.double()
                weights = recipe.token_weights(self._log_probs(t, row_mask[rows], temperature, False),
                                               self._log_probs(s, row_mask[rows], temperature, False))
                if weights.shape != (s.shape[0], n_terms):
                    raise RuntimeError(f"method {self.method.name!r}: token_weights returned shape "
                                       f"{tuple(weights.shape)} for {s.shape[0]} rows, expected "
                                       f"{(s.shape[0], n_terms)}")
                out.append(weights)
        return torch.cat(out).detach()

    def _evaluate_torch_loss(self, student_rows, teacher_rows, row_mask, temperature):
        log_q = self._log_probs(student_rows, row_mask, temperature, True)
        log_p = self._log_probs(teacher_rows, row_mask, temperature, True)
        per_token = self.method.torch_loss(log_p, log_q, **self.params)
        if per_token.shape != row_mask.shape:
            raise RuntimeError(f"method {self.method.name!r}: torch_loss returned shape "
                               f"{tuple(per_token.shape)}, expected one value per token {tuple(row_mask.shape)}")
        with torch.no_grad():
            lse = torch.stack([torch.logsumexp(x.detach().to(log_q.dtype) / temperature, dim=-1)
                               for x in (student_rows, teacher_rows)], dim=1)
        return torch.where(row_mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)), lse


def _combine(results, masks):
    """(loss [N], LSEs [N, >= 2]) of recipes on disjoint rows: the losses add (0 off each recipe's
    rows), the LSEs are each row's own recipe's."""
    loss, lse = results[0][0], results[0][1][:, :2]
    for (part_loss, part_lse), mask in zip(results[1:], masks[1:]):
        loss = loss + part_loss
        lse = torch.where(mask[:, None], part_lse[:, :2].to(lse.dtype), lse)
    return loss, lse


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and type(x).__module__.startswith("torch.distributed")


def _align_vocab(student_logits, teacher_logits, vocab_align=None):
    if vocab_align is None or not isinstance(student_logits, torch.Tensor) \
            or not isinstance(teacher_logits, torch.Tensor) or student_logits.dim() == 0 \
            or teacher_logits.dim() == 0:
        return student_logits, teacher_logits
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs == vt:
        return student_logits, teacher_logits
    if vocab_align == "truncate":
        v = min(vs, vt)
        return student_logits[..., :v], teacher_logits[..., :v]
    # "pad": the missing columns are vocabulary entries of probability 0 (never logit 0).
    pad = lambda x, v: torch.nn.functional.pad(x, (0, v - x.shape[-1]), value=float("-inf"))  # noqa: E731
    v = max(vs, vt)
    return pad(student_logits, v), pad(teacher_logits, v)


def _check_topk(topk, lead):
    if tuple(topk.shape[:-1]) != lead:
        raise ValueError(f"kdplug: the TopK teacher has leading shape {tuple(topk.shape[:-1])}, "
                         f"student_logits has {lead}")


def _check_logits(student_logits, teacher_logits):
    """Validates the logits (``teacher_logits=None``: a sparse teacher); returns (leading shape, V)."""
    if teacher_logits is None:
        pairs = (("student_logits", student_logits),)
    else:
        pairs = (("student_logits", student_logits), ("teacher_logits", teacher_logits))
    for name, x in pairs:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"kdplug: {name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"kdplug: {name} must be a floating-point tensor [..., V], got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"kdplug: {name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if teacher_logits is None:
        return tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"kdplug: vocabulary sizes differ: student_logits has V={student_logits.shape[-1]}, "
                         f"teacher_logits has V={teacher_logits.shape[-1]}; pass vocab_align='truncate' or "
                         "'pad' to kdplug.get if the extra entries are padding")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kdplug: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"kdplug: student_logits is on {student_logits.device} but teacher_logits is on "
                         f"{teacher_logits.device}")
    return tuple(student_logits.shape[:-1]), student_logits.shape[-1]


def _sampled_ids(ids, lead, device):
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError("kdplug: log_ratio_at must be an integer tensor of token ids")
    if tuple(ids.shape) != lead:
        raise ValueError(f"kdplug: log_ratio_at has shape {tuple(ids.shape)}, expected the logits' leading shape "
                         f"{lead}")
    return ids.to(device=device, dtype=torch.int64)


def _token_mask(mask, labels, ignore_index, lead, device):
    if mask is not None and labels is not None:
        raise ValueError("kdplug: pass mask= or labels=, not both")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError("kdplug: labels must be an integer tensor of token ids")
        if tuple(labels.shape) != lead:
            raise ValueError(f"kdplug: labels has shape {tuple(labels.shape)}, expected the logits' leading "
                             f"shape {lead}")
        return (labels != ignore_index).to(device)
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point():
        raise TypeError("kdplug: mask must be a bool (or integer 0/1) tensor")
    if tuple(mask.shape) != lead:
        raise ValueError(f"kdplug: mask has shape {tuple(mask.shape)}, expected the logits' leading shape {lead}")
    return mask.to(device=device, dtype=torch.bool)


def _sequence_flags(flags, name, lead, device):
    flags = torch.as_tensor(flags, device=device)
    if flags.is_floating_point():
        raise TypeError(f"kdplug: {name} must be a bool tensor, one value per sequence")
    if not lead or tuple(flags.shape) != lead[:1]:
        raise ValueError(f"kdplug: {name} has shape {tuple(flags.shape)}, expected one value per sequence "
                         f"{lead[:1]}")
    return flags.bool().reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)


def _reduction_weights(token_mask, reduction, num_items):
    """``w`` with ``_reduce(x) == (x * w).sum()`` for the scalar reductions (the leading shape)."""
    ones = token_mask.to(torch.float64)
    if reduction == "sum":
        if num_items is not None:
            raise ValueError("kdplug: num_items is used by reduction 'mean', 'batchmean' and 'sequence' only")
        return ones
    if num_items is not None:
        denominator = _items_denominator(num_items, ones.device, torch.float64)
    elif reduction == "mean":
        denominator = ones.sum().clamp_min(1)
    else:
        if ones.dim() == 0:
            raise ValueError(f"kdplug: reduction={reduction!r} needs a batch dimension [B, ..., H]")
        denominator = max(ones.shape[0], 1)
    if reduction == "sequence" and ones.dim() > 1:
        per_sequence = ones.sum(dim=tuple(range(1, ones.dim())), keepdim=True).clamp_min(1)
        return ones / per_sequence / denominator
    return ones / denominator


def _items_denominator(num_items, device, dtype):
    """num_items as the denominator of a reduction: a single count >= 0, and 1 where it is 0 (no
    token anywhere: the sum is 0 too). A Python number is checked here; a tensor's value is not
    (reading it would synchronize the device and break torch.compile graphs)."""
    if isinstance(num_items, (int, float)) and not (math.isfinite(num_items) and num_items >= 0):
        raise ValueError(f"kdplug: num_items must be a finite count >= 0, got {num_items!r}")
    num_items = torch.as_tensor(num_items, device=device)
    if num_items.numel() != 1:
        raise ValueError("kdplug: num_items must be a single count")
    return num_items.to(dtype).clamp_min(1)


def _reduce(per_token, token_mask, reduction, num_items):
    if reduction == "none":
        if num_items is not None:
            raise ValueError("kdplug: num_items is used by reduction 'mean', 'batchmean' and 'sequence' only")
        return per_token
    if reduction == "sum":
        if num_items is not None:
            raise ValueError("kdplug: num_items is used by reduction 'mean', 'batchmean' and 'sequence' only")
        return per_token.sum()
    if num_items is not None:
        denominator = _items_denominator(num_items, per_token.device, per_token.dtype)
    if reduction == "mean":
        if num_items is None:
            denominator = token_mask.sum().to(per_token.dtype).clamp_min(1)
        return per_token.sum() / denominator
    if per_token.dim() == 0:
        raise ValueError(f"kdplug: reduction={reduction!r} needs logits with a batch dimension [B, ..., V]")
    if reduction == "batchmean":
        if num_items is None:
            denominator = max(per_token.shape[0], 1)  # (an empty batch: 0, as a fully masked one)
        return per_token.sum() / denominator
    # "sequence": the token mean of each sequence (first dimension), then the mean over sequences;
    # a sequence without unmasked tokens contributes 0.
    dims = tuple(range(1, per_token.dim()))
    per_sequence = per_token.sum(dim=dims) / token_mask.sum(dim=dims).to(per_token.dtype).clamp_min(1) \
        if dims else per_token
    if num_items is None:
        denominator = max(per_token.shape[0], 1)
    return per_sequence.sum() / denominator
