"""AKL's per-token head/tail term weights in PyTorch (the compiled twin: csrc/cpu/head_tail_rows.cpp).

    order="descending" (AKL's rule): the head H is the teacher's most probable entries whose
        cumulative probability stays <= mu, the top-1 entry always included; the tail the rest.
    order="ascending" (KDFlow's rule): sort ascending; the tail is the entries whose running sum
        from the smallest stays <= mu, the head the rest.
    g_head = sum_{v in H} |p_v - q_v|,  g_tail = sum_{v not in H} |p_v - q_v|
    (w_head, w_tail) = (g_head, g_tail) / (g_head + g_tail),  (1/2, 1/2) when p == q

Ties are broken by vocabulary index (a stable sort). The descending head comes from the row's top
entries (``torch.topk``; a sort only for rows whose head is longer than that), the ascending rule
takes a full sort per row.
"""
from __future__ import annotations

import torch

_ROWS_PER_CHUNK = 1024  # bounds the temporaries (values + int64 indices) per chunk
_TOP = 256  # entries taken by torch.topk to find the head; rows with a longer head are sorted


def _sorted_head(p, mu: float, descending: bool):
    """The head as the rule states it: a stable sort, then a running sum."""
    sorted_p, order = torch.sort(p, dim=-1, descending=descending, stable=True)
    running = sorted_p.cumsum(dim=-1)
    if descending:
        in_head = running <= mu
        in_head[:, 0] = True
    else:
        in_head = running > mu
    return torch.zeros_like(in_head).scatter_(-1, order, in_head)


def _top_head(p, mu: float):
    """The descending rule's head without a full sort (the same set as _sorted_head(descending=True)).

    The head is a prefix of the descending order: its length L is the number of running sums
    <= mu (at least 1), and the top k values give it whenever L < k (a running sum depends only
    on the values, so ties do not change it). With v the smallest head value, the head is every
    entry above v plus the first L - #(p > v) entries equal to v by vocabulary index (the stable
    sort's tie order). Rows with L = k fall back to the sort.
    """
    k = min(_TOP, p.shape[-1])
    values = torch.topk(p, k, dim=-1).values
    length = (values.cumsum(dim=-1) <= mu).sum(-1, keepdim=True).clamp_min(1)
    v = values.gather(-1, length - 1)
    above, equal = p > v, p == v
    ties_in_head = length - above.sum(-1, keepdim=True)
    ties = equal.sum(-1, keepdim=True)
    head = above | (equal & (ties <= ties_in_head))
    split = (ties > ties_in_head)[:, 0]  # a tie straddles the boundary
    if bool(split.any()):
        rank = equal[split].cumsum(dim=-1)
        head[split] = above[split] | (equal[split] & (rank <= ties_in_head[split]))
    long = (length[:, 0] >= k) & (k < p.shape[-1])
    if bool(long.any()):
        head[long] = _sorted_head(p[long], mu, descending=True)
    return head


def head_tail_weights(log_p_teacher, log_q_student, *, mu: float, order: str):
    """``[n, 2]`` (w_head, w_tail) from log-probability rows ``[n, V]``, in their dtype."""
    out = []
    for lp, lq in zip(log_p_teacher.split(_ROWS_PER_CHUNK), log_q_student.split(_ROWS_PER_CHUNK)):
        p = lp.double().exp()
        gap = torch.exp(lq.double()).sub_(p).abs_()
        # NB: _top_head branches on the data (ties at the boundary, long heads); under
        # torch.compile the sort keeps the graph static.
        if order == "descending" and not torch.compiler.is_compiling():
            in_head = _top_head(p, mu)
        else:
            in_head = _sorted_head(p, mu, descending=order == "descending")
        g_head = torch.where(in_head, gap, 0.0).sum(-1)
        g_tail = torch.where(in_head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        safe = torch.where(total > 0, total, 1.0)
        w_head = torch.where(total > 0, g_head / safe, 0.5)
        w_tail = torch.where(total > 0, g_tail / safe, 0.5)
        out.append(torch.stack((w_head, w_tail), dim=-1))
    return torch.cat(out).to(log_p_teacher.dtype)
