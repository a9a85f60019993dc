"""Sparse (top-k) teachers for offline distillation.

A teacher stored as its k most probable token ids per position becomes a distribution over k
categories (``tail="renormalize"``) or k + 1 (``tail="bucket"``: the mass outside the k ids is one
more category). The student is normalized over its full row, then read at the same ids (plus its
own mass outside them for the bucket). Any method then runs on these short rows, on the compiled
core when it can. With k = V and ``tail="renormalize"`` this is the dense loss.

Re-tempering stored log-probabilities (taken at ``temperature``, say T0) to the loss temperature
T: the k log-probabilities are multiplied by T0 / T and renormalized over the k ids (exact for
the ratios between the stored ids). In bucket mode the tail is re-tempered as one category,
``(T0 / T) log(tail mass)``, before the k + 1 categories are renormalized: an approximation,
since the tail's own shape is unknown.
"""
from __future__ import annotations

import dataclasses

import torch

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class TopK:
    """A sparse teacher: ``indices`` (int64) and ``values`` (float) of shape ``[..., k]``.

    Args:
        indices: vocabulary ids, each in ``[0, V)``, unique within a position.
        values: ``kind="logprobs"``: the teacher's log-probabilities at those ids (normalized over
            the full vocabulary); ``kind="logits"``: its raw logits there (then only
            ``tail="renormalize"`` is possible: the full row's normalizer is unknown).
        kind: ``"logprobs"`` or ``"logits"``.
        tail: ``"bucket"`` (the missing mass is one extra category on both sides) or
            ``"renormalize"`` (both distributions renormalized over the k ids).
        temperature: the temperature the log-probabilities were taken at (``None``: the loss's
            own, i.e. no re-tempering). Only for ``kind="logprobs"``.
    """

    indices: torch.Tensor
    values: torch.Tensor
    kind: str = "logprobs"
    tail: str = "bucket"
    temperature: float | None = None

    def __post_init__(self):
        if self.kind not in ("logprobs", "logits"):
            raise ValueError(f"TopK.kind must be 'logprobs' or 'logits', got {self.kind!r}")
        if self.tail not in ("bucket", "renormalize"):
            raise ValueError(f"TopK.tail must be 'bucket' or 'renormalize', got {self.tail!r}")
        if not isinstance(self.indices, torch.Tensor) or self.indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("TopK.indices must be an int64 (or int32) tensor of vocabulary ids")
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            raise TypeError("TopK.values must be a floating-point tensor")
        if self.indices.shape != self.values.shape or self.indices.dim() == 0:
            raise ValueError(f"TopK.indices {tuple(self.indices.shape)} and TopK.values "
                             f"{tuple(self.values.shape)} must have the same shape [..., k]")
        if self.kind == "logits" and self.tail == "bucket":
            raise ValueError("TopK: kind='logits' cannot give the mass outside the k ids; use "
                             "tail='renormalize', or store log-probabilities (kind='logprobs')")
        if self.temperature is not None:
            if self.kind != "logprobs":
                raise ValueError("TopK.temperature re-tempers stored log-probabilities; raw logits "
                                 "are divided by the loss temperature directly")
            if not self.temperature > 0:
                raise ValueError(f"TopK.temperature must be > 0, got {self.temperature}")

    @property
    def shape(self):
        return self.indices.shape


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0`` without cancellation (Maechler's switch at -log 2)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _safe_logsumexp(x):
    """``logsumexp`` over the last dim whose gradient is 0, not NaN, on an all ``-inf`` row."""
    empty = (x == NEG_INF).all(dim=-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros((), dtype=x.dtype, device=x.device), x), -1, keepdim=True)
    return torch.where(empty, torch.full_like(out, NEG_INF), out)


def rows(student_rows: torch.Tensor, topk: TopK, temperature: float, vocab: int, row_mask: torch.Tensor):
    """Student and teacher log-probability rows ``[N, k (+1)]`` at the teacher's ids.

    ``student_rows`` is ``[N, V]`` (any float dtype, differentiable). The student's log-probs are
    normalized over its full row; its bucket is the log-sum-exp of the entries outside the ids
    (not ``1 - sum``, which cancels when the ids hold almost all the mass). Results are fp32
    (fp64 for fp64 inputs).
    """
    k = topk.indices.shape[-1]
    indices = topk.indices.reshape(-1, k).to(device=student_rows.device, dtype=torch.int64)
    values = topk.values.reshape(indices.shape).to(student_rows.device)
    if indices.shape[0] != student_rows.shape[0]:
        raise ValueError(f"kdplug: the TopK teacher has leading shape {tuple(topk.indices.shape[:-1])}, "
                         "which does not match student_logits")
    dtype = torch.float64 if torch.float64 in (student_rows.dtype, values.dtype) else torch.float32
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1) & row_mask
    torch._assert_async(~repeated.any(), "kdplug: TopK.indices must be distinct ids within a position "
                                         "(an id given twice would count its probability twice)")
    indices = torch.where(row_mask[:, None], indices, 0)
    torch._assert_async(((indices >= 0) & (indices < vocab)).all(),
                        f"kdplug: TopK.indices must be vocabulary ids in [0, {vocab})")
    # NB: masked rows are never read (they may hold NaN): they become zeros.
    s = torch.where(row_mask[:, None], student_rows.to(dtype), torch.zeros((), dtype=dtype,
                                                                              device=student_rows.device))
    s = s / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lq = s.gather(-1, indices) - lse
    values = values.to(dtype)
    if topk.kind == "logits":
        return torch.log_softmax(lq, dim=-1), torch.log_softmax(values / temperature, dim=-1)
    lp = values
    retemper = topk.temperature is not None and topk.temperature != temperature
    scale = topk.temperature / temperature if retemper else 1.0
    if topk.tail == "renormalize":
        return torch.log_softmax(lq, dim=-1), torch.log_softmax(lp * scale, dim=-1)
    # NB: the tail is 1 - sum exp(lp). Stored log-probabilities may sum a little above 1 (bf16
    # rounding: the tail is then 0), but not by more than 1%: that is what raw logits passed as
    # kind="logprobs" look like. (NaN passes here: the rows' own check names it.)
    log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
    too_much = (log_mass > 0.01) & row_mask[:, None]
    torch._assert_async(~too_much.any(), "kdplug: TopK values (kind='logprobs', tail='bucket') hold more than 1 "
                                         "of probability at some position; for raw logits pass kind='logits'")
    if k == vocab:  # the ids cover the vocabulary: the bucket is empty on both sides
        tail_p = tail_q = torch.full_like(lq[:, :1], NEG_INF)
    else:
        tail_p = _log1mexp(log_mass)
        tail_q = _safe_logsumexp(s.scatter(-1, indices, NEG_INF)) - lse
    teacher = torch.cat([lp, tail_p], dim=-1)
    if retemper:
        teacher = torch.log_softmax(teacher * scale, dim=-1)
    return torch.cat([lq, tail_q], dim=-1), teacher
