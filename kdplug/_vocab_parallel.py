"""Vocabulary-parallel evaluation: each rank of a process group holds a shard of the vocabulary.

With ``kdplug.get(name, process_group=group)``, the logits a rank passes are its columns
``[..., V_rank]`` of the student's and the teacher's ``[..., V]`` logits (the same columns on both
sides, ranks in group-rank order, any split); or both logits are DTensors sharded on their last
dimension over a 1-D device mesh (``local_shards``). Every per-row quantity the loss and its gradient
need is a log-sum-exp or a sum over the vocabulary, so each rank computes its shard's part and
the parts are combined across the group between passes (see ``divergence_partials`` in
``csrc/cpu/divergence_rows.h`` for the stages):

    stage 0  LSE(s/T), LSE(t/T) (and the geometric mixture's LSE)  -> log-sum-exp across ranks
    stage 1  log Z of an alpha-mixture assistant                   -> log-sum-exp across ranks
    stage 2  the loss and the sums behind U and H^r                -> sum across ranks

The per-token loss comes back whole (the same on every rank); the backward needs no further
communication: given the combined row statistics, each rank's gradient is its shard's columns of
the unsharded gradient. Every rank must call the loss with the same tokens, mask and reduction.

The compiled core does this on the CPU (``divergence_partials``); elsewhere, and with
``backend="torch"``, the PyTorch path runs with the same combination (``ShardedRows``), which
also communicates in its backward.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from . import _ops

__all__ = ["ShardedRows", "gather_columns", "local_shards", "recipe_loss", "shard_offset", "shard_widths",
           "why_cannot_run"]


class ShardedRows:
    """Row reductions across the ranks of ``group`` (the counterpart of ``_torch_impl.LocalRows``)."""

    def __init__(self, group):
        self.group = group

    def lse(self, x: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp across ranks of per-rank log-sum-exps (all -inf stays -inf, NaN stays NaN)."""
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.logsumexp(torch.stack(parts), dim=0)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=self.group)
        return x


def shard_widths(group, width: int) -> list[int]:
    """Every rank's shard width, in rank order, from this rank's ``width``."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([width], dtype=torch.int64), group=group)
    return [int(s) for s in sizes]


def shard_offset(group, width: int) -> tuple[int, int]:
    """(first column of this rank's shard, the whole vocabulary size) from every rank's ``width``."""
    sizes = shard_widths(group, width)
    return sum(sizes[:dist.get_rank(group)]), sum(sizes)


def gather_columns(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """The whole rows ``[N, V]`` from every rank's columns ``[N, V_rank]`` (``sizes``: the ranks'
    widths, ``shard_widths``; not differentiable)."""
    # all_gather takes equal shapes: each shard is padded to the widest, and the padding cut off
    padded = torch.nn.functional.pad(x, (0, max(sizes) - x.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1)


def local_shards(student_logits, teacher_logits, group):
    """The local shards and the group of DTensor logits sharded on their last dimension over a
    1-D device mesh (the student's ``to_local`` is differentiable: its gradient is a DTensor with
    the same placement)."""
    from torch.distributed.tensor import DTensor, Shard

    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, DTensor):
            raise TypeError(f"kdplug: {name} is a {type(x).__name__} but the other logits are a DTensor; pass "
                            "both as DTensors sharded on the vocabulary (last) dimension, or both as local shards")
        if x.device_mesh.ndim != 1 or len(x.placements) != 1 or not isinstance(x.placements[0], Shard) \
                or x.placements[0].dim not in (-1, x.dim() - 1):
            raise ValueError(f"kdplug: {name} must be a DTensor on a 1-D mesh with placement Shard(-1) (the "
                             f"vocabulary dimension), got {x.placements} on a {x.device_mesh.ndim}-D mesh")
    if student_logits.device_mesh != teacher_logits.device_mesh:
        raise ValueError("kdplug: student_logits and teacher_logits are DTensors on different device meshes")
    mesh_group = student_logits.device_mesh.get_group()
    if group is not None and group != mesh_group:
        raise ValueError("kdplug: process_group differs from the DTensors' mesh group; pass one of them")
    return student_logits.to_local(), teacher_logits.to_local(), mesh_group


def why_cannot_run(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> str | None:
    """Why the compiled core cannot evaluate these vocabulary shards, or None if it can."""
    reason = _ops.why_cannot_run(student_rows, teacher_rows)
    if reason is None and student_rows.device.type != "cpu":
        reason = ("the vocabulary-parallel statistics (divergence_partials) have a CPU kernel only; "
                  "on CUDA the PyTorch path runs")
    return reason


def _mixture(structure, consts) -> str:
    """"none", "geometric", "arithmetic" or "alpha" (as csrc/kdplug_math.h's decode_recipe)."""
    if not structure[1]:
        return "none"
    a = (1.0 - consts[0]) / 2.0
    return "geometric" if a == 0.0 else "arithmetic" if a == 1.0 else "alpha"


def _check_rows(lse: torch.Tensor, row_mask: torch.Tensor) -> None:
    """The combined LSEs of unmasked rows must be finite (as the kernels' row check)."""
    bad = row_mask[:, None] & ~torch.isfinite(lse)
    if bool(bad.any()):
        row, side = (int(i) for i in bad.nonzero()[0])
        name = ("student_logits", "teacher_logits")[side]
        raise RuntimeError(f"kdplug: {name} has a row that is not masked but is all -inf, or holds +inf or NaN "
                           f"(row {row}, across the vocabulary shards); mask such rows (mask= or labels=)")


class _ShardedRecipeLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_rows, teacher_rows, params, token_weights, row_mask, structure, consts, rows,
                inplace):
        partials = functools.partial(torch.ops.kdplug.divergence_partials, student_rows, teacher_rows, params,
                                     token_weights, row_mask)
        lse = rows.lse(partials(None, 0, structure, consts))  # [N, 3] float64
        _check_rows(lse[:, :2], row_mask)
        mixture = _mixture(structure, consts)
        if mixture == "geometric":
            log_z = lse[:, 2]
        elif mixture == "alpha":
            log_z = rows.lse(partials(lse[:, :2].contiguous(), 1, structure, consts))[:, 0]
        else:
            log_z = torch.zeros_like(lse[:, 0])
        given = torch.stack([lse[:, 0], lse[:, 1], log_z], dim=1)
        sums = rows.sum(partials(given, 2, structure, consts))  # loss, h_q, h_r, w h_r, w r
        h_r = sums[:, 2]
        u = sums[:, 1] + sums[:, 3] - h_r * sums[:, 4]  # U, as forward_rows expands it
        dtype = _ops._compute_dtype(student_rows.dtype)
        row_stats = torch.stack([lse[:, 0], lse[:, 1], log_z, h_r, u], dim=1).to(dtype)
        loss = torch.where(row_mask, sums[:, 0], torch.zeros((), dtype=sums.dtype)).to(dtype)
        ctx.save_for_backward(student_rows, teacher_rows, params, token_weights, row_mask, row_stats)
        ctx.structure, ctx.consts, ctx.inplace = structure, consts, inplace
        ctx.mark_non_differentiable(row_stats)
        return loss, row_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_stats):
        grad = _ops.student_grad(ctx.needs_input_grad, grad_loss, *ctx.saved_tensors, ctx.structure, ctx.consts,
                                 inplace=ctx.inplace)
        return grad, None, None, None, None, None, None, None, None


def recipe_loss(student_rows, teacher_rows, params, token_weights, row_mask, structure, consts, group,
                inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``[N]`` (whole, on every rank) and ``row_stats`` of vocabulary shards on the
    compiled core; the gradient is this rank's columns. Check :func:`why_cannot_run` first."""
    return _ShardedRecipeLoss.apply(student_rows, teacher_rows, params.to(torch.float64),
                                    _ops._op_weights(token_weights), row_mask,
                                    list(structure), list(consts), ShardedRows(group), inplace)
