"""The compiled core as PyTorch sees it: fake kernels, autograd, and the entry point KDLoss uses.

``torch.ops.kdplug.divergence_fwd`` / ``divergence_bwd`` are defined in C++ (``csrc/kdplug.cpp``,
schemas and their documentation). Here, registered only when the extension loaded (so that
``import kdplug`` works without it):

- fake kernels, so that ``torch.compile`` / ``torch.export`` can trace the ops;
- autograd for ``divergence_fwd``: its backward is the ``divergence_bwd`` op (itself not
  differentiable: no double backward through the compiled core);

and, always:

- :func:`why_cannot_run`: why the compiled path cannot take given logits (None when it can);
- :func:`recipe_loss`: the compiled twin of ``kdplug._torch_impl.RecipeLoss.apply``, with the
  gradient optionally written over the student logits (``divergence_bwd_inplace``), or computed
  in the forward for eager CPU training (``divergence_fwd_grad``).

- :func:`split_recipe_loss`: a Split's recipes on their own rows, with one gradient tensor
  (``divergence_bwd_into``);
- :func:`student_grad`: the backward every compiled-core autograd path shares.

- :func:`head_tail_weights`: AKL's token weights (:class:`kdplug.HeadTailWeights`) from the
  ``head_tail_weights`` op, on the devices it has a kernel for (:func:`has_head_tail_kernel`).

``divergence_partials`` (the vocabulary-parallel forward's per-shard statistics) is called by
``kdplug._vocab_parallel``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import _extension

__all__ = ["N_STATS", "grad_in_forward", "has_head_tail_kernel", "head_tail_weights", "recipe_loss",
           "split_recipe_loss", "student_grad", "why_cannot_run"]

N_STATS = 5  # row_stats columns (csrc/kdplug_math.h, enum Stat)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Decided once at import: a plain module constant is what torch.compile can guard on.
HAS_OPS: bool = _extension.has_ops()
DEVICES: frozenset[str] = frozenset(_extension.build_info().get("backends", ())) if HAS_OPS else frozenset()


def why_cannot_run(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> str | None:
    """Why the compiled ops cannot evaluate these ``[N, V]`` logits, or None if they can.

    Only static facts (whether the ops exist, device, dtype, ``requires_grad``, strides) decide,
    so the answer is guardable under ``torch.compile`` without a graph break.
    """
    if not HAS_OPS:
        return _extension.why_not() or "the compiled ops are not available"
    device = student_rows.device.type
    if device not in DEVICES:
        return (f"the compiled core has no kernel for device {device!r} "
                f"(this build has: {', '.join(sorted(DEVICES))})")
    if student_rows.dtype not in DTYPES:
        return f"the compiled core does not take {student_rows.dtype} logits (float32, float64, bfloat16, float16)"
    if teacher_rows.dtype != student_rows.dtype:
        return (f"student_logits ({student_rows.dtype}) and teacher_logits ({teacher_rows.dtype}) have different "
                "dtypes (the compiled core takes one dtype; cast one of them)")
    if teacher_rows.requires_grad:
        return ("teacher_logits requires grad and the compiled core differentiates w.r.t. the student only "
                "(detach the teacher's logits, or compute them under torch.no_grad())")
    if student_rows.shape[-1] > 1 and (student_rows.stride(-1) != 1 or teacher_rows.stride(-1) != 1):
        return "the logits' last dimension is not contiguous (stride != 1)"
    return None


def has_head_tail_kernel(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> bool:
    """Whether the ``head_tail_weights`` op takes these ``[N, V]`` logits: the divergence ops'
    conditions (it reads detached logits, so a teacher that requires grad is no obstacle), on the
    CPU (it has no CUDA kernel)."""
    return (student_rows.device.type == "cpu"
            and why_cannot_run(student_rows.detach(), teacher_rows.detach()) is None)


def head_tail_weights(student_rows: torch.Tensor, teacher_rows: torch.Tensor, row_mask: torch.Tensor,
                      temperature: float, spec) -> torch.Tensor:
    """``[N, 2]`` float64 (w_head, w_tail) of ``spec`` (a :class:`kdplug.HeadTailWeights`) for
    logit rows ``[N, V]`` of one dtype at ``temperature``; (1/2, 1/2) on masked rows."""
    return torch.ops.kdplug.head_tail_weights(student_rows.detach(), teacher_rows.detach(), row_mask,
                                              float(temperature), spec.mu, spec.order == "descending")


def grad_in_forward(student_rows: torch.Tensor) -> bool:
    """Whether :func:`recipe_loss` computes the gradient in the forward when given ``expected``:
    eager training on the CPU (under ``torch.compile`` the graph keeps a separate backward)."""
    return (HAS_OPS and student_rows.device.type == "cpu" and student_rows.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling())


def recipe_loss(student_rows: torch.Tensor, teacher_rows: torch.Tensor, params: torch.Tensor,
                token_weights: torch.Tensor | None, row_mask: torch.Tensor, structure: Sequence[int],
                consts: Sequence[float], inplace: bool = False,
                expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``[N]`` of a packed recipe on the compiled core, and its ``row_stats``.

    Same arguments, values and gradient as ``kdplug._torch_impl.RecipeLoss.apply`` (layout in its
    docstring): differentiable w.r.t. ``student_rows`` only. Check :func:`why_cannot_run` first.
    ``inplace``: the backward writes the gradient over ``student_rows`` and returns it (no N x V
    allocation); a later backward that needs those logits then fails autograd's version check
    instead of reading a gradient. ``row_stats`` (``[N, 5]``, not differentiable) holds each row's
    ``LSE(s / T)`` and ``LSE(t / T)`` in its first two columns. ``expected``: the incoming
    per-token gradient the caller predicts (its reduction's weights, ``[N]``); where
    :func:`grad_in_forward` holds, the gradient is then computed in the forward
    (:class:`_ForwardGradRecipeLoss`).
    """
    token_weights = _op_weights(token_weights)
    params = params.to(torch.float64)
    if inplace:
        loss, row_stats = _InplaceRecipeLoss.apply(student_rows, teacher_rows, params, token_weights, row_mask,
                                                   list(structure), list(consts))
    elif expected is not None and grad_in_forward(student_rows):
        expected = expected.detach().to(_compute_dtype(student_rows.dtype)).contiguous()
        loss, row_stats = _ForwardGradRecipeLoss.apply(student_rows, teacher_rows, params, token_weights, row_mask,
                                                       expected, list(structure), list(consts))
    else:
        loss, row_stats = torch.ops.kdplug.divergence_fwd(student_rows, teacher_rows, params, token_weights, row_mask,
                                                          list(structure), list(consts))
    if loss.device.type != "cpu":
        # The CUDA kernels cannot raise without a host sync: a row that is not masked but is all
        # -inf (or holds +inf / NaN) comes back with a NaN loss and a non-finite LSE in row_stats.
        # Fail on it as the CPU kernel does, asynchronously (a device-side assert; O(N) work).
        torch._assert_async(torch.isfinite(row_stats[:, :2]).all(),
                            "kdplug: student_logits or teacher_logits has a row that is not masked but is all "
                            "-inf, or holds +inf or NaN; mask such rows (mask= or labels=)")
    return loss, row_stats


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_weights(token_weights: torch.Tensor | None) -> torch.Tensor | None:
    """Token weights as the ops take them: detached contiguous float64."""
    return None if token_weights is None else token_weights.detach().to(torch.float64).contiguous()


def _no_teacher_grad(needs_input_grad):
    if needs_input_grad[1]:
        raise RuntimeError("kdplug: the compiled core differentiates w.r.t. student_logits only, but "
                           "teacher_logits requires grad; use backend='torch' for a teacher gradient")


def student_grad(needs_input_grad, grad_loss, student_rows, teacher_rows, params, token_weights, row_mask,
                 row_stats, structure, consts, inplace: bool = False):
    """The backward of every compiled-core autograd path: the gradient w.r.t. the student rows
    (written over them with ``inplace``), or None when not needed; a teacher that requires grad
    is an error."""
    _no_teacher_grad(needs_input_grad)
    if not needs_input_grad[0]:
        return None
    args = (grad_loss.to(_compute_dtype(student_rows.dtype)), student_rows, teacher_rows, params, token_weights,
            row_mask, row_stats, structure, consts)
    if not inplace:
        return torch.ops.kdplug.divergence_bwd(*args)
    torch.ops.kdplug.divergence_bwd_inplace(*args)
    # NB: an op defined in C++ does not bump the version counter of what it mutates: done here, so
    # that a node that saved these logits fails autograd's check instead of reading a gradient.
    torch.autograd.graph.increment_version(student_rows)
    return student_rows


if HAS_OPS:
    def _check_rows_fake(student_logits, teacher_logits, row_mask):
        torch._check(student_logits.dim() == 2, lambda: "kdplug: student_logits must be [N, V]")
        torch._check(teacher_logits.shape == student_logits.shape,
                     lambda: "kdplug: student_logits and teacher_logits must have the same shape")
        torch._check(teacher_logits.dtype == student_logits.dtype,
                     lambda: "kdplug: student_logits and teacher_logits must have the same dtype")
        torch._check(row_mask.dim() == 1 and row_mask.shape[0] == student_logits.shape[0],
                     lambda: "kdplug: row_mask must be [N]")

    @torch.library.register_fake("kdplug::divergence_fwd")
    def _divergence_fwd_fake(student_logits, teacher_logits, params, token_weights, row_mask, structure, consts):
        _check_rows_fake(student_logits, teacher_logits, row_mask)
        n_terms = structure[3]
        torch._check(params.dim() == 1 and params.shape[0] == 2 + n_terms,
                     lambda: "kdplug: params must be [T, lam, weight * n_terms]")
        if token_weights is not None:
            torch._check(token_weights.shape == (student_logits.shape[0], n_terms),
                         lambda: "kdplug: token_weights must be [N, n_terms]")
        dtype = _compute_dtype(student_logits.dtype)
        n = student_logits.shape[0]
        return student_logits.new_empty((n,), dtype=dtype), student_logits.new_empty((n, N_STATS), dtype=dtype)

    @torch.library.register_fake("kdplug::divergence_fwd_grad")
    def _divergence_fwd_grad_fake(student_logits, teacher_logits, params, token_weights, row_mask, grad_scale,
                                  structure, consts):
        loss, row_stats = _divergence_fwd_fake(student_logits, teacher_logits, params, token_weights, row_mask,
                                               structure, consts)
        torch._check(grad_scale.shape == (student_logits.shape[0],), lambda: "kdplug: grad_scale must be [N]")
        return loss, row_stats, student_logits.new_empty(student_logits.shape)

    @torch.library.register_fake("kdplug::divergence_fwd_grad_into")
    def _divergence_fwd_grad_into_fake(student_logits, teacher_logits, params, token_weights, row_mask, grad_scale,
                                       structure, consts, grad):
        loss, row_stats = _divergence_fwd_fake(student_logits, teacher_logits, params, token_weights, row_mask,
                                               structure, consts)
        torch._check(grad_scale.shape == (student_logits.shape[0],), lambda: "kdplug: grad_scale must be [N]")
        torch._check(grad.shape == student_logits.shape, lambda: "kdplug: grad must be [N, V]")
        return loss, row_stats

    @torch.library.register_fake("kdplug::divergence_bwd")
    def _divergence_bwd_fake(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats,
                             structure, consts):
        torch._check(student_logits.dim() == 2, lambda: "kdplug: student_logits must be [N, V]")
        torch._check(teacher_logits.shape == student_logits.shape,
                     lambda: "kdplug: student_logits and teacher_logits must have the same shape")
        torch._check(grad_loss.shape == (student_logits.shape[0],), lambda: "kdplug: grad_loss must be [N]")
        torch._check(row_stats.shape == (student_logits.shape[0], N_STATS),
                     lambda: f"kdplug: row_stats must be [N, {N_STATS}]")
        return student_logits.new_empty(student_logits.shape)

    def _setup_context(ctx, inputs, output):
        student_logits, teacher_logits, params, token_weights, row_mask, structure, consts = inputs
        _, row_stats = output
        ctx.save_for_backward(student_logits, teacher_logits, params, token_weights, row_mask, row_stats)
        ctx.structure, ctx.consts = structure, consts
        ctx.mark_non_differentiable(row_stats)

    def _backward(ctx, grad_loss, _grad_row_stats):
        grad_student = student_grad(ctx.needs_input_grad, grad_loss, *ctx.saved_tensors, ctx.structure, ctx.consts)
        return grad_student, None, None, None, None, None, None

    torch.library.register_autograd("kdplug::divergence_fwd", _backward, setup_context=_setup_context)

    @torch.library.register_fake("kdplug::divergence_bwd_inplace")
    def _divergence_bwd_inplace_fake(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask,
                                     row_stats, structure, consts):
        _divergence_bwd_fake(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats,
                             structure, consts)

    @torch.library.register_fake("kdplug::divergence_bwd_into")
    def _divergence_bwd_into_fake(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask,
                                  row_stats, structure, consts, grad):
        _divergence_bwd_fake(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, row_stats,
                             structure, consts)

    @torch.library.register_fake("kdplug::divergence_partials")
    def _divergence_partials_fake(student_logits, teacher_logits, params, token_weights, row_mask, given, stage,
                                  structure, consts):
        torch._check(stage in (0, 1, 2), lambda: "kdplug: stage must be 0, 1 or 2")
        width = (3, 1, 5)[stage]
        return student_logits.new_empty((student_logits.shape[0], width), dtype=torch.float64)

    @torch.library.register_fake("kdplug::head_tail_weights")
    def _head_tail_weights_fake(student_logits, teacher_logits, row_mask, temperature, mu, descending):
        _check_rows_fake(student_logits, teacher_logits, row_mask)
        return student_logits.new_empty((student_logits.shape[0], 2), dtype=torch.float64)


class _InplaceRecipeLoss(torch.autograd.Function):
    """``divergence_fwd`` whose backward writes the gradient over the student logits."""

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, params, token_weights, row_mask, structure, consts):
        loss, row_stats = torch.ops.kdplug.divergence_fwd(student_rows, teacher_rows, params, token_weights,
                                                          row_mask, structure, consts)
        ctx.save_for_backward(student_rows, teacher_rows, params, token_weights, row_mask, row_stats)
        ctx.structure, ctx.consts = structure, consts
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats):
        grad = student_grad(ctx.needs_input_grad, grad_loss, *ctx.saved_tensors, ctx.structure, ctx.consts,
                            inplace=True)
        return grad, None, None, None, None, None, None


class _ForwardGradRecipeLoss(torch.autograd.Function):
    """``divergence_fwd_grad``: the gradient for the incoming gradient the caller expects is
    computed in the forward, while each row is in cache, and kept for the backward.

    Eager training computes the loss and then its gradient, so the gradient's inputs are read
    from memory once instead of twice, and the expensive per-entry math runs once per training
    step on cached rows. The backward returns the kept gradient as it is when the incoming
    gradient equals ``expected`` on every unmasked row (``loss.backward()`` on KDLoss' reduced
    loss), scales its rows when they differ by a finite factor per row (a loss scaled further: one
    pass over the gradient; in bfloat16 / float16 only by a power of two common to all rows), and otherwise
    (a row that expected 0 receives a gradient, a second backward through the graph) recomputes it
    with ``divergence_fwd_grad`` for the incoming gradient. The cost: the gradient's memory is held
    from the forward on, and a forward that is never differentiated did its work.
    """

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, params, token_weights, row_mask, expected, structure, consts):
        loss, row_stats, grad = torch.ops.kdplug.divergence_fwd_grad(student_rows, teacher_rows, params, token_weights,
                                                                     row_mask, expected, structure, consts)
        ctx.save_for_backward(student_rows, teacher_rows, params, token_weights, row_mask, row_stats, expected)
        ctx.grad = grad
        ctx.structure, ctx.consts = structure, consts
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats):
        student_rows, teacher_rows, params, token_weights, row_mask, row_stats, expected = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        nones = (None,) * 7
        if grad is not None and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]:
            grad = _kept_grad(grad, grad_loss, expected, row_mask)
            if grad is not None:
                return (grad,) + nones
        if ctx.needs_input_grad[1] or not ctx.needs_input_grad[0]:
            return (student_grad(ctx.needs_input_grad, grad_loss, student_rows, teacher_rows, params, token_weights,
                                 row_mask, row_stats, ctx.structure, ctx.consts),) + nones
        # NB: recomputed by the forward's own op, not divergence_bwd: for the logit-space recipes
        # the two round differently (see forward_grad_row_logit), and a second backward with the
        # same incoming gradient must give the first one's bits (gradcheck checks reentrancy)
        _, _, grad = torch.ops.kdplug.divergence_fwd_grad(student_rows, teacher_rows, params, token_weights,
                                                          row_mask, grad_loss.to(expected.dtype).contiguous(),
                                                          ctx.structure, ctx.consts)
        return (grad,) + nones


def _kept_grad(grad, grad_loss, expected, row_mask):
    """The gradient computed in the forward for ``expected``, as the backward of ``grad_loss``:
    as it is when the two agree on every unmasked row, its rows rescaled when they differ by a
    finite factor per row; None when it must be recomputed."""
    grad_loss = grad_loss.to(expected.dtype)
    # masked rows have a zero gradient whatever comes in: compare the unmasked ones
    one = torch.ones((), dtype=expected.dtype)
    ratio = torch.where(row_mask, grad_loss, one) / torch.where(row_mask, expected, one)
    if bool((ratio == 1).all()):
        return grad
    if not bool(torch.isfinite(ratio).all()):
        return None
    if grad.dtype in (torch.float32, torch.float64):
        return grad.mul_(ratio[:, None])
    # NB: in bfloat16 / float16 only by a power of two common to the unmasked rows (loss / 4,
    # 0.5 * loss): that product is exact (barring float16 underflow), where any other factor would
    # round the rounded gradient again, up to an ulp off where divergence_bwd and the PyTorch path
    # are half of one off
    live = ratio[row_mask]  # (not empty: with every row masked, ratio is 1 everywhere)
    if bool((live == live[0]).all()) and float(torch.frexp(live[0]).mantissa.abs()) == 0.5:
        return grad.mul_(live[0])  # (masked rows are 0 whatever the factor)
    return None


def split_recipe_loss(student_rows: torch.Tensor, teacher_rows: torch.Tensor, parts,
                      expected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``[N]`` and ``row_stats`` of several recipes, each on its own rows.

    ``parts``: ``(params, token_weights, row_mask, structure, consts)`` per recipe, with disjoint
    row masks (a Split). Every recipe's gradient rows go into one gradient tensor, instead of one
    N x V gradient per recipe and their sum: computed in the forward where :func:`grad_in_forward`
    holds and ``expected`` is given (the first recipe's ``divergence_fwd_grad`` zero-fills the
    rows of the others, which ``divergence_fwd_grad_into`` then fills; as
    :class:`_ForwardGradRecipeLoss` otherwise), else in the backward (``divergence_bwd``, then
    ``divergence_bwd_into``).
    """
    flat = []
    for params, token_weights, row_mask, structure, consts in parts:
        flat += [params.to(torch.float64), _op_weights(token_weights), row_mask, list(structure), list(consts)]
    if expected is not None and grad_in_forward(student_rows):
        expected = expected.detach().to(_compute_dtype(student_rows.dtype)).contiguous()
        return _ForwardGradSplitLoss.apply(student_rows, teacher_rows, expected, *flat)
    return _SplitRecipeLoss.apply(student_rows, teacher_rows, *flat)


def _split_fwd_grad(student_rows, teacher_rows, parts, grad_scale):
    """Loss, row_stats and the gradient for ``grad_scale`` of a Split's recipes, one gradient tensor."""
    loss = row_stats = grad = None
    for params, token_weights, row_mask, structure, consts in parts:
        if grad is None:
            loss, row_stats, grad = torch.ops.kdplug.divergence_fwd_grad(student_rows, teacher_rows, params,
                                                                         token_weights, row_mask, grad_scale,
                                                                         structure, consts)
        else:
            part_loss, part_stats = torch.ops.kdplug.divergence_fwd_grad_into(student_rows, teacher_rows, params,
                                                                              token_weights, row_mask, grad_scale,
                                                                              structure, consts, grad)
            # masked rows give 0 loss and 0 statistics: the parts add up row by row
            loss, row_stats = loss + part_loss, row_stats + part_stats
    return loss, row_stats, grad


class _ForwardGradSplitLoss(torch.autograd.Function):
    """A Split's recipes with the gradient computed in the forward (see _ForwardGradRecipeLoss)."""

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, expected, *flat):
        parts = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        loss, row_stats, grad = _split_fwd_grad(student_rows, teacher_rows, parts, expected)
        ctx.save_for_backward(student_rows, teacher_rows, expected,
                              *[x for params, token_weights, row_mask, _, _ in parts
                                for x in (params, token_weights, row_mask)])
        ctx.grad = grad
        ctx.static = [(structure, consts) for _, _, _, structure, consts in parts]
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats):
        student_rows, teacher_rows, expected, *saved = ctx.saved_tensors
        parts = [(*saved[3 * i: 3 * i + 3], *static) for i, static in enumerate(ctx.static)]
        grad, ctx.grad = ctx.grad, None
        nones = (None,) * (1 + 5 * len(parts))
        _no_teacher_grad(ctx.needs_input_grad)
        if not ctx.needs_input_grad[0]:
            return (None, None) + nones
        if grad is not None:
            rows = functools.reduce(torch.logical_or, [row_mask for _, _, row_mask, _, _ in parts])
            grad = _kept_grad(grad, grad_loss, expected, rows)
            if grad is not None:
                return (grad, None) + nones
        # NB: recomputed by the forward's own ops (as _ForwardGradRecipeLoss), so that a second
        # backward with the same incoming gradient gives the first one's bits
        grad_loss = grad_loss.to(expected.dtype).contiguous()
        return (_split_fwd_grad(student_rows, teacher_rows, parts, grad_loss)[2], None) + nones


class _SplitRecipeLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_rows, teacher_rows, *flat):
        parts = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        loss = row_stats = None
        saved = [student_rows, teacher_rows]
        for params, token_weights, row_mask, structure, consts in parts:
            part_loss, part_stats = torch.ops.kdplug.divergence_fwd(student_rows, teacher_rows, params, token_weights,
                                                                    row_mask, structure, consts)
            # masked rows give 0 loss and 0 statistics: the parts add up row by row
            loss = part_loss if loss is None else loss + part_loss
            row_stats = part_stats if row_stats is None else row_stats + part_stats
            saved += [params, token_weights, row_mask, part_stats]
        ctx.save_for_backward(*saved)
        ctx.static = [(structure, consts) for _, _, _, structure, consts in parts]
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats):
        student_rows, teacher_rows, *saved = ctx.saved_tensors
        grad = student_grad(ctx.needs_input_grad, grad_loss, student_rows, teacher_rows, *saved[:4], *ctx.static[0])
        if grad is not None:
            grad_loss = grad_loss.to(_compute_dtype(student_rows.dtype))
            for i, (structure, consts) in enumerate(ctx.static[1:], start=1):
                torch.ops.kdplug.divergence_bwd_into(grad_loss, student_rows, teacher_rows, *saved[4 * i: 4 * i + 4],
                                                     structure, consts, grad)
        return (grad, None) + (None,) * (5 * len(ctx.static))
