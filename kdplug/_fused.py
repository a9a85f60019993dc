"""The lm_head fused with the loss: logits are made one chunk of tokens at a time and never kept.

For each chunk of rows the student's logits are computed in fp32 from the matmul (no rounding to
the hidden states' dtype before the divergence), the loss and its gradient w.r.t. those logits
come from the same evaluator as the unfused call (the compiled core when it can run), and the
gradients w.r.t. the hidden states, the weight and the bias are accumulated right away (the
weight's and bias's in fp32). The chunk's logits and their gradient are then dropped, so the
memory above the inputs is a few chunks of logits plus the gradients themselves, whatever N is
(the gradient w.r.t. a chunk's logits is written over them, ``inplace_backward``).
The backward only scales the stored gradients by the incoming one (the reduction is a scalar).
"""
from __future__ import annotations

import torch

from ._topk import TopK

_MATMUL_BYTES = 64 << 20  # bounds the fp32 copy of a weight slice made for half-precision weights


def _logits_fp32(hidden, weight, bias):
    """``hidden @ weight.T + bias`` in fp32 (fp64 for fp64), from the matmul's accumulator."""
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    if hidden.dtype == dtype and weight.dtype == dtype:
        out = hidden @ weight.T
    else:
        out = None
        if hidden.is_cuda and hidden.dtype == weight.dtype:
            try:  # a half-precision GEMM that keeps its fp32 accumulator
                out = torch.mm(hidden, weight.T, out_dtype=dtype)
            except (RuntimeError, TypeError):
                out = None
        if out is None:
            out = torch.empty(hidden.shape[0], weight.shape[0], dtype=dtype, device=hidden.device)
            h = hidden.to(dtype)
            step = max(1, _MATMUL_BYTES // (weight.shape[1] * out.element_size()))
            for v0 in range(0, weight.shape[0], step):
                torch.mm(h, weight[v0:v0 + step].to(dtype).T, out=out[:, v0:v0 + step])
    if bias is not None:
        out += bias.to(dtype)
    return out


def _mm_into(grad_logits, weight, out_dtype):
    """``grad_logits @ weight`` in the gradient's precision."""
    if weight.dtype == grad_logits.dtype:
        return (grad_logits @ weight).to(out_dtype)
    out = torch.zeros(grad_logits.shape[0], weight.shape[1], dtype=grad_logits.dtype, device=grad_logits.device)
    step = max(1, _MATMUL_BYTES // (weight.shape[1] * grad_logits.element_size()))
    for v0 in range(0, weight.shape[0], step):
        out.addmm_(grad_logits[:, v0:v0 + step], weight[v0:v0 + step].to(grad_logits.dtype))
    return out.to(out_dtype)


def _teacher_chunk(teacher, rows, dtype):
    """The teacher's rows for a chunk whose student logits are ``dtype`` (fp32, or fp64)."""
    if isinstance(teacher, TopK):
        k = teacher.indices.shape[-1]
        return TopK(teacher.indices.reshape(-1, k)[rows], teacher.values.reshape(-1, k)[rows], teacher.kind,
                    teacher.tail, teacher.temperature)
    if isinstance(teacher, tuple):
        hidden, weight, bias = teacher
        with torch.no_grad():
            return _logits_fp32(hidden[rows], weight, bias)
    rows = teacher[rows]
    # half-precision teacher logits are widened (exactly) to the student chunk's dtype: the compiled
    # core takes both sides in one dtype, and a chunk is small enough to copy
    return rows.to(dtype) if rows.dtype in (torch.bfloat16, torch.float16) else rows


def chunk_rows_for(budget_bytes: int, vocab: int, buffers: int = 2, dtype_bytes: int = 4) -> int:
    """Rows per chunk so that a chunk's ``buffers`` row blocks of logits fit the budget: the student's
    and the teacher's (the gradient is written over the student's), 3 for a Split (distillm2)."""
    return max(1, budget_bytes // (buffers * vocab * dtype_bytes))


class FusedLMHead(torch.autograd.Function):
    """``apply(loss_fn, align, coef, row_mask, flags, teacher, chunk_rows, hidden, weight, bias)`` ->
    the reduced loss, with ``coef`` [N] the derivative of the reduction w.r.t. each token's loss and
    ``align(student_logits, teacher_logits)`` the vocabulary alignment of a chunk."""

    @staticmethod
    def forward(ctx, loss_fn, align, coef, row_mask, flags, teacher, chunk_rows, hidden, weight, bias):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.need = need
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64,
                                  device=weight.device) if need[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=grad_weight.dtype if grad_weight is not None else torch.float32,
                                device=bias.device) if need[2] else None
        for r0 in range(0, n, chunk_rows):
            rows = slice(r0, min(n, r0 + chunk_rows))
            h = hidden[rows]
            logits = _logits_fp32(h, weight, bias).requires_grad_(any(need))
            with torch.enable_grad():
                teacher_rows = _teacher_chunk(teacher, rows, logits.dtype)
                student_rows = logits
                if not isinstance(teacher_rows, TopK):
                    student_rows, teacher_rows = align(logits, teacher_rows)
                # the chunk's logits are ours: their gradient is written over them (a Split reads
                # the rows twice, so not there)
                per_token, _ = loss_fn._per_token(student_rows, teacher_rows, row_mask[rows],
                                                  None if flags is None else flags[rows], inplace=flags is None)
                chunk_loss = (per_token * coef[rows].to(per_token.dtype)).sum()
            total += chunk_loss.detach().to(total.dtype)
            if not any(need):
                continue
            (g,) = torch.autograd.grad(chunk_loss, logits)
            del logits, per_token, chunk_loss
            if need[0]:
                grad_hidden[rows] = _mm_into(g, weight, hidden.dtype)
            if need[1]:
                grad_weight.addmm_(g.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
            if need[2]:
                grad_bias += g.sum(0).to(grad_bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        # NB: scaled in place: these buffers become the gradients (no second weight-sized copy);
        # the graph is not retained past this backward.
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return (None,) * 7 + tuple(grads)  # autograd casts each to its input's dtype
