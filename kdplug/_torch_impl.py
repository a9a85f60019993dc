"""Pure-PyTorch evaluation of a packed recipe: the fallback, and the executable spec of the core.

It computes exactly what ``csrc/kdplug_math.h`` computes, element for element, with tensor ops:
the per-token loss in the forward, and the closed-form gradient in the backward (no autograd
through the element math, which is what keeps it NaN-free at zero probabilities). See
``csrc/kdplug_math.h`` for the derivations; the comments here only name the pieces.

Packed recipe (written by ``kdplug._pack.pack``; the C++ ops take the same three pieces):

- ``structure`` (ints):  ``[policy, has_assistant, detach, n_terms, (lhs, rhs, div) * n_terms]``
  with policy 0 = exact, 1 = exclude; operands 0 = teacher, 1 = student, 2 = assistant;
  divergences 0 = KL, 1 = CE, 2 = AB, 3 = TVD.
- ``consts`` (floats, static): ``[alpha, (ab_alpha, ab_beta) * n_terms]``.
- ``params`` (a float64 tensor, may change between calls): ``[T, lam, weight * n_terms]``.
"""
from __future__ import annotations

import torch

TEACHER, STUDENT, ASSISTANT = 0, 1, 2
KL, CE, AB, TVD = 0, 1, 2, 3
EXACT, EXCLUDE = 0, 1
NEG_INF = float("-inf")


def _sel(cond, a, b):
    return torch.where(cond, a, b)


def _mul0(a, b):
    """``a * b`` where ``a == 0`` gives 0 even for an infinite ``b`` (select before multiply)."""
    return torch.where(a == 0, torch.zeros((), dtype=a.dtype, device=a.device), a * b)


def _pow(log_x, c: float):
    """``x ** c`` from ``log x`` (``x ** 0 == 1`` also at ``x == 0``)."""
    return torch.ones_like(log_x) if c == 0 else torch.exp(c * log_x)


def _phi(x, c: float):
    """``expm1(c x) / c``, with its limit ``x`` at ``c == 0``."""
    return x if c == 0 else torch.expm1(c * x) / c


def _ab_elem(l_big, x, c: float, d: float):
    """AB element ``-(M**k / d) [phi(x, c) - phi(x, k)]`` and its limits (see the math header)."""
    k = c + d
    if d != 0:
        out = -(_pow(l_big, k) / d) * (_phi(x, c) - _phi(x, k))
    elif c != 0:
        # x * exp(c x) -> 0 as x -> -inf
        xe = torch.where(torch.isinf(x), torch.zeros_like(x), x * torch.exp(c * x))
        out = _pow(l_big, c) * (c * xe - torch.expm1(c * x)) / (c * c)
    else:
        out = 0.5 * x * x
    return out


def element(div: int, lP, lQ, ab_alpha: float, ab_beta: float):
    """Per-element divergence ``e`` and its partials ``de/dlog P``, ``de/dlog Q``."""
    zero = torch.zeros((), dtype=lP.dtype, device=lP.device)
    P = torch.exp(lP)
    if div == KL or div == CE:
        if div == KL:
            diff = lP - lQ
            e = _mul0(P, diff)
            dP = _mul0(P, diff + 1)
        else:
            e = _mul0(P, -lQ)
            dP = e
        return e, dP, -P
    Q = torch.exp(lQ)
    if div == TVD:
        sign = torch.sign(P - Q)
        return 0.5 * (P - Q).abs(), 0.5 * P * sign, -0.5 * Q * sign
    # AB(alpha, beta): both logs -inf -> everything 0.
    a, b = ab_alpha, ab_beta
    both = (lP == NEG_INF) & (lQ == NEG_INF)
    lP_ = torch.where(both, zero, lP)
    lQ_ = torch.where(both, zero, lQ)
    q_big = lQ_ >= lP_
    x_pq = lP_ - lQ_   # <= 0 where Q >= P
    x_qp = lQ_ - lP_   # <= 0 where P > Q
    e = torch.where(q_big, _ab_elem(lQ_, x_pq, a, b), _ab_elem(lP_, x_qp, b, a))
    Pa, Pb, Qa, Qb = _pow(lP_, a), _pow(lP_, b), _pow(lQ_, a), _pow(lQ_, b)
    dQ = torch.where(q_big, -_mul0(Qa, _phi(x_pq, a)), _mul0(Pa, _phi(x_qp, a)))
    dQ = _mul0(Qb, dQ)
    dP = torch.where(q_big, _mul0(Qb, _phi(x_pq, b)), -_mul0(Pb, _phi(x_qp, b)))
    dP = _mul0(Pa, dP)
    return (torch.where(both, zero, e), torch.where(both, zero, dP), torch.where(both, zero, dQ))


def mixture_log(lp, lq, lam, a: float):
    """Unnormalized log of the alpha-mixture ``(lam p^a + (1-lam) q^a)^(1/a)``; ``a == 0`` geometric.

    Evaluated as ``l_base + log1p(w_other * expm1(a (l_other - l_base))) / a`` with the base
    chosen so that the expm1 argument is <= 0: no overflow, no cancellation as ``a -> 0``.
    """
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if a == 0:
        mixed = lam * torch.where(lp == NEG_INF, zero, lp) + (1 - lam) * torch.where(lq == NEG_INF, zero, lq)
        # A zero on a side with positive weight makes the geometric mixture 0.
        zero_mix = ((lp == NEG_INF) & (lam > 0)) | ((lq == NEG_INF) & (lam < 1))
        return torch.where(zero_mix, torch.full_like(lp, NEG_INF), mixed)
    both = (lp == NEG_INF) & (lq == NEG_INF)
    lp_ = torch.where(both, zero, lp)
    lq_ = torch.where(both, zero, lq)
    on_q = a * (lp_ - lq_) <= 0
    from_q = lq_ + torch.log1p(lam * torch.expm1(a * (lp_ - lq_))) / a
    from_p = lp_ + torch.log1p((1 - lam) * torch.expm1(a * (lq_ - lp_))) / a
    out = torch.where(on_q, from_q, from_p)
    return torch.where(both, torch.full_like(lp, NEG_INF), out)


def _mixture_weight(l_side, l_mix, side_weight, a: float):
    """``d log r~ / d log side = side_weight * (side / r~)^a``; 0 where the side is 0."""
    zero = torch.zeros((), dtype=l_side.dtype, device=l_side.device)
    if a == 0:
        w = side_weight.expand_as(l_side) if torch.is_tensor(side_weight) else torch.full_like(l_side, side_weight)
    else:
        w = side_weight * torch.exp(a * (l_side - torch.where(l_mix == NEG_INF, zero, l_mix)))
    return torch.where(l_side == NEG_INF, zero, w)


def _decode(structure, consts):
    policy, has_assistant, detach, n_terms = structure[:4]
    terms = []
    for i in range(n_terms):
        lhs, rhs, div = structure[4 + 3 * i: 7 + 3 * i]
        terms.append((lhs, rhs, div, consts[1 + 2 * i], consts[2 + 2 * i]))
    return policy, bool(has_assistant), bool(detach), consts[0], terms


class _Row:
    """Everything about a block of rows that the forward and the backward both need."""

    def __init__(self, student_logits, teacher_logits, params, row_mask, structure, consts):
        dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
        self.policy, self.has_assistant, self.detach, alpha, self.terms = _decode(structure, consts)
        params = params.to(dtype)
        self.T = params[0]
        self.lam = params[1]
        self.weights = params[2:]
        zero = torch.zeros((), dtype=dtype, device=student_logits.device)
        keep_row = row_mask[:, None]
        # Masked rows are never read: they may hold NaN or be all -inf.
        s = torch.where(keep_row, student_logits.to(dtype), zero)
        t = torch.where(keep_row, teacher_logits.to(dtype), zero)
        self.s_is_neg_inf = s == NEG_INF
        self.t_is_neg_inf = t == NEG_INF
        self.keep = None
        if self.policy == EXCLUDE:
            self.keep = torch.isfinite(s) & torch.isfinite(t)
        self.lse_s = torch.logsumexp(s / self.T, dim=-1, keepdim=True)
        self.lse_t = torch.logsumexp(t / self.T, dim=-1, keepdim=True)
        self.lq = s / self.T - self.lse_s
        self.lp = t / self.T - self.lse_t
        self.a = (1.0 - alpha) / 2.0 if alpha < 1.0 else 0.0  # alpha >= 1 arrives as 1 (geometric)
        self.lr = self.lr_tilde = None
        if self.has_assistant:
            lr_tilde = mixture_log(self.lp, self.lq, self.lam, self.a)
            if self.a == 1.0:  # arithmetic mixture: already normalized
                log_z = torch.zeros_like(self.lse_s)
            else:
                log_z = torch.logsumexp(lr_tilde, dim=-1, keepdim=True)
            # A mixture that is 0 everywhere (disjoint supports under a geometric mixture) is
            # left at 0 instead of 0/0.
            self.lr = torch.where(log_z == NEG_INF, lr_tilde, lr_tilde - torch.where(log_z == NEG_INF, zero, log_z))
            self.lr_tilde = lr_tilde

    def logs(self, operand):
        return (self.lp, self.lq, self.lr)[operand]

    def terms_iter(self, token_weights):
        """Yields (e, dP, dQ, lhs, rhs, coefficient [n, 1]) per term."""
        for i, (lhs, rhs, div, ab_a, ab_b) in enumerate(self.terms):
            e, dP, dQ = element(div, self.logs(lhs), self.logs(rhs), ab_a, ab_b)
            if self.keep is not None:
                zero = torch.zeros((), dtype=e.dtype, device=e.device)
                e = torch.where(self.keep, e, zero)
                dP = torch.where(self.keep, dP, zero)
                dQ = torch.where(self.keep, dQ, zero)
            coef = self.weights[i].reshape(1, 1)
            if token_weights is not None:
                coef = coef * token_weights[:, i: i + 1].to(e.dtype)
            yield e, dP, dQ, lhs, rhs, coef


def forward(student_logits, teacher_logits, params, token_weights, row_mask, structure, consts):
    """Per-token loss ``[N]`` (0 on masked rows)."""
    rows = _Row(student_logits, teacher_logits, params, row_mask, structure, consts)
    _check_rows(rows, row_mask)
    loss = torch.zeros_like(rows.lse_s)
    for e, _, _, _, _, coef in rows.terms_iter(token_weights):
        loss = loss + _mul0(coef, e.sum(dim=-1, keepdim=True))
    loss = loss.squeeze(-1)
    return torch.where(row_mask, loss, torch.zeros_like(loss))


def _check_rows(rows, row_mask):
    for name, lse in (("student_logits", rows.lse_s), ("teacher_logits", rows.lse_t)):
        bad = row_mask & ~torch.isfinite(lse.squeeze(-1))
        torch._assert_async(~bad.any(), f"kdplug: {name} has a row that is not masked but is all "
                                        "-inf, or holds +inf or NaN; mask such rows (mask= or labels=)")


def backward(grad_loss, student_logits, teacher_logits, params, token_weights, row_mask, structure,
             consts, need_teacher: bool):
    """Gradients w.r.t. the student (and teacher) logits: ``scale * (u - q * sum(u)) / T``."""
    rows = _Row(student_logits, teacher_logits, params, row_mask, structure, consts)
    dtype = rows.lq.dtype
    zero = torch.zeros((), dtype=dtype, device=rows.lq.device)
    h = [torch.zeros_like(rows.lq), torch.zeros_like(rows.lq), torch.zeros_like(rows.lq)]  # teacher, student, assistant
    for _, dP, dQ, lhs, rhs, coef in rows.terms_iter(token_weights):
        # NB: an infinite partial only occurs where the element itself is +inf (a genuine support
        # mismatch); the gradient of such a token is taken over its finite entries, never NaN.
        h[lhs] = h[lhs] + _mul0(coef, torch.where(torch.isfinite(dP), dP, zero))
        h[rhs] = h[rhs] + _mul0(coef, torch.where(torch.isfinite(dQ), dQ, zero))
    scale = torch.where(row_mask, grad_loss.to(dtype), zero)[:, None] / rows.T
    live = scale != 0

    def through_assistant(side_log, side_weight):
        if not rows.has_assistant or rows.detach:
            return 0
        r = torch.exp(rows.lr)
        w = _mixture_weight(side_log, rows.lr_tilde, side_weight, rows.a)
        h_r = h[ASSISTANT]
        return w * (h_r - h_r.sum(dim=-1, keepdim=True) * r)

    def grad(side, side_log, is_neg_inf, side_weight, like):
        u = h[side] + through_assistant(side_log, side_weight)
        prob = torch.exp(side_log)
        g = scale * (u - prob * u.sum(dim=-1, keepdim=True))
        # NB: the gradient w.r.t. a -inf logit is 0, and a token whose incoming gradient is 0
        # gets exactly 0 (its loss may be +inf).
        g = torch.where(live & ~is_neg_inf, g, zero)
        return g.to(like.dtype)

    grad_student = grad(STUDENT, rows.lq, rows.s_is_neg_inf, 1 - rows.lam, student_logits)
    grad_teacher = None
    if need_teacher:
        grad_teacher = grad(TEACHER, rows.lp, rows.t_is_neg_inf, rows.lam, teacher_logits)
    return grad_student, grad_teacher


class RecipeLoss(torch.autograd.Function):
    """Per-token recipe loss with the closed-form gradient (first order only)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, params, token_weights, row_mask, structure, consts):
        ctx.save_for_backward(student_logits, teacher_logits, params, token_weights, row_mask)
        ctx.structure = structure
        ctx.consts = consts
        return forward(student_logits, teacher_logits, params, token_weights, row_mask, structure, consts)

    @staticmethod
    def backward(ctx, grad_loss):
        student_logits, teacher_logits, params, token_weights, row_mask = ctx.saved_tensors
        grad_s, grad_t = backward(grad_loss, student_logits, teacher_logits, params, token_weights,
                                  row_mask, ctx.structure, ctx.consts, ctx.needs_input_grad[1])
        return grad_s, grad_t, None, None, None, None, None
