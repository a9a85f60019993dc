"""AKL, adaptive KL: forward KL on the teacher's head, reverse KL on its tail, weighted per token
by how much of the student's error each part holds.

    head H = the teacher's most probable entries whose cumulative probability stays <= mu
             (the top-1 entry always belongs to it); tail = the rest
    g_head = sum_{v in H} |p_v - q_v|,  g_tail = sum_{v not in H} |p_v - q_v|
    loss = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)

The weights carry no gradient. ``variant="kdflow"`` uses KDFlow's head rule instead: sort
ascending, the tail is the entries whose running sum from the smallest stays <= mu.
Ties are broken by vocabulary index (stable sort); when p == q the weights are 1/2 each.
The weights are computed in PyTorch (a sort per token) and fed to the core as per-token
term weights.
"""
import functools

import torch

import kdplug
from kdplug import Method, Recipe, Term

from ._checks import choice, number

_ROWS_PER_CHUNK = 1024  # bounds the sort's temporaries (values + int64 indices) per chunk


def head_tail_weights(log_p_teacher, log_q_student, *, mu: float, variant: str):
    out = []
    for lp, lq in zip(log_p_teacher.split(_ROWS_PER_CHUNK), log_q_student.split(_ROWS_PER_CHUNK)):
        p = lp.double().exp()
        gap = (p - lq.double().exp()).abs()
        descending = variant == "official"
        sorted_p, order = torch.sort(p, dim=-1, descending=descending, stable=True)
        running = sorted_p.cumsum(dim=-1)
        if descending:
            in_head = running <= mu
            in_head[:, 0] = True
        else:
            in_head = running > mu
        sorted_gap = gap.gather(-1, order)
        g_head = torch.where(in_head, sorted_gap, 0.0).sum(-1)
        g_tail = torch.where(in_head, 0.0, sorted_gap).sum(-1)
        total = g_head + g_tail
        safe = torch.where(total > 0, total, 1.0)
        w_head = torch.where(total > 0, g_head / safe, 0.5)
        w_tail = torch.where(total > 0, g_tail / safe, 0.5)
        out.append(torch.stack((w_head, w_tail), dim=-1))
    return torch.cat(out).to(log_p_teacher.dtype)


def build(mu: float = 0.5, variant: str = "official") -> Recipe:
    mu = number("akl", "mu", mu, 0.0, 1.0, lo_open=True, hi_open=True)
    choice("akl", "variant", variant, ("official", "kdflow"))
    return Recipe((Term("teacher", "student"), Term("student", "teacher")),
                  token_weights=functools.partial(head_tail_weights, mu=mu, variant=variant))


@kdplug.hookimpl
def register_methods(register):
    register(Method("akl", build=build, aliases=("adaptive_kl",),
                    summary="adaptive KL: head-weighted KL(p||q) + tail-weighted KL(q||p)",
                    reference="Wu et al. 2025 (AKL, COLING), arXiv:2404.02657; wutaiqiang/LLM_KD_AKL"))
