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


# The series of the limit brackets for small |y| (see the math header): coefficients of y^0 .. y^8.
_SERIES_D0 = (1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360, 1 / 403200)
_SERIES_C0 = (1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320, 1 / 362880, 1 / 3628800)


def _ab_elem(l_big, x, c: float, d: float):
    """AB element ``-(M**k / d) [phi(x, c) - phi(x, k)]`` as ``(M**k / k) [e^{cx} phi(x, d) -
    phi(x, c)]`` (no cancellation where d is small) and its limits (see the math header)."""
    k = c + d
    if c != 0 and d != 0:
        # NB: M^k may underflow to 0 while the bracket is infinite: select 0.
        return _mul0(_pow(l_big, k), (_pow(x, c) * _phi(x, d) - _phi(x, c)) / k)
    if k == 0:
        return 0.5 * x * x
    # one of c, d is 0: the bracket cancels for small |y| = |k x|, where its series is used
    y = k * x
    small = y.abs() < 0.1
    ys = torch.where(small, y, torch.zeros((), dtype=y.dtype, device=y.device))
    xs = torch.where(small, x, torch.zeros((), dtype=x.dtype, device=x.device))
    series = torch.zeros_like(ys)
    for coef in reversed(_SERIES_D0 if d == 0 else _SERIES_C0):
        series = series * ys + coef
    if d == 0:
        # x * exp(c x) -> 0 as x -> -inf
        xe = torch.where(torch.isinf(x), torch.zeros_like(x), x * torch.exp(y))
        direct = (c * xe - torch.expm1(y)) / (c * c)
    else:
        direct = (_phi(x, d) - x) / d  # +inf at x = -inf
    return _mul0(_pow(l_big, k), torch.where(small, xs * xs * series, direct))


def _nan0_(x):
    """In place: NaN -> 0 (the select-before-multiply of ``0 * inf`` terms), infinities kept."""
    return torch.nan_to_num_(x, nan=0.0, posinf=float("inf"), neginf=NEG_INF)


def element(div: int, lP, lQ, ab_alpha: float, ab_beta: float, partials: bool = True):
    """Per-element divergence ``e`` and (if ``partials``) ``de/dlog P``, ``de/dlog Q``."""
    P = torch.exp(lP)
    if div == KL or div == CE:
        # NB: every NaN below is a 0 * inf with P == 0, whose limit is 0.
        if div == KL:
            diff = lP - lQ
            e = _nan0_(P * diff)
            dP = _nan0_(diff.add_(1).mul_(P)) if partials else None
        else:
            e = _nan0_(-P * lQ)
            dP = e if partials else None
        return e, dP, (-P if partials else None)
    Q = torch.exp(lQ)
    if div == TVD:
        diff = P - Q
        e = diff.abs().mul_(0.5)
        if not partials:
            return e, None, None
        sign = torch.sign(diff).mul_(0.5)
        return e, P * sign, -Q * sign
    # AB(alpha, beta): both logs -inf -> everything 0.
    zero = torch.zeros((), dtype=lP.dtype, device=lP.device)
    a, b = ab_alpha, ab_beta
    both = (lP == NEG_INF) & (lQ == NEG_INF)
    lP_ = torch.where(both, zero, lP)
    lQ_ = torch.where(both, zero, lQ)
    q_big = lQ_ >= lP_
    x_pq = lP_ - lQ_   # <= 0 where Q >= P
    x_qp = lQ_ - lP_   # <= 0 where P > Q
    e = torch.where(both, zero, torch.where(q_big, _ab_elem(lQ_, x_pq, a, b), _ab_elem(lP_, x_qp, b, a)))
    if not partials:
        return e, None, None
    Pa, Pb, Qa, Qb = _pow(lP_, a), _pow(lP_, b), _pow(lQ_, a), _pow(lQ_, b)
    dQ = torch.where(q_big, -_mul0(Qa, _phi(x_pq, a)), _mul0(Pa, _phi(x_qp, a)))
    dQ = _mul0(Qb, dQ)
    dP = torch.where(q_big, _mul0(Qb, _phi(x_pq, b)), -_mul0(Pb, _phi(x_qp, b)))
    dP = _mul0(Pa, dP)
    return e, torch.where(both, zero, dP), torch.where(both, zero, dQ)


def mixture_log(lp, lq, lam, a: float):
    """Unnormalized log of the alpha-mixture ``(lam p^a + (1-lam) q^a)^(1/a)``; ``a == 0`` geometric.

    Evaluated as ``l_base + log(w_base + w_other e^y) / a`` with ``y = a (l_other - l_base) <= 0``
    (the base chosen so: no overflow): as ``log1p(w_other * expm1(y))`` while that argument is
    >= -1/2 (no cancellation as ``a -> 0``), else as ``logaddexp(log w_base, log w_other + y)``.
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
    base = torch.where(on_q, lq_, lp_)
    y = a * (torch.where(on_q, lp_, lq_) - base)
    z = torch.where(on_q, lam, 1 - lam) * torch.expm1(y)
    # NB: 1 + z loses the digits of w_base + w_other e^y once z nears -1 (a weight near 0 or 1
    # and a far smaller other side: in fp32, lam = 0 made r~ = 0 where q / p < e^-17); there
    # |log| >= log 2 and the sum is taken in log space instead.
    log_lam, log_1m_lam = torch.log(lam), torch.log1p(-lam)
    in_logs = torch.logaddexp(torch.where(on_q, log_1m_lam, log_lam), torch.where(on_q, log_lam, log_1m_lam) + y)
    out = base + torch.where(z >= -0.5, torch.log1p(z), in_logs) / a
    # NB: lam = 0 and 1 are q and p exactly; for a < 0 the formula would give 0 * inf there.
    out = torch.where(lam == 0, lq, torch.where(lam == 1, lp, out))
    return torch.where(both, torch.full_like(lp, NEG_INF), out)


def _mixture_weight(l_side, l_mix, side_weight, a: float):
    """``d log r~ / d log side = side_weight * (side / r~)^a``; 0 where the side is 0."""
    zero = torch.zeros((), dtype=l_side.dtype, device=l_side.device)
    if a == 0:
        w = side_weight.expand_as(l_side) if torch.is_tensor(side_weight) else torch.full_like(l_side, side_weight)
    else:
        # NB: a zero weight (lam = 0 or 1) gives 0 even where (side / r~)^a overflows.
        w = _mul0(side_weight * torch.ones_like(l_side),
                  torch.exp(a * (l_side - torch.where(l_mix == NEG_INF, zero, l_mix))))
    return torch.where(l_side == NEG_INF, zero, w)


def _decode(structure, consts):
    policy, has_assistant, detach, n_terms = structure[:4]
    terms = []
    for i in range(n_terms):
        lhs, rhs, div = structure[4 + 3 * i: 7 + 3 * i]
        terms.append((lhs, rhs, div, consts[1 + 2 * i], consts[2 + 2 * i]))
    return policy, bool(has_assistant), bool(detach), consts[0], terms


class LocalRows:
    """Row reductions over the whole vocabulary held here (the vocabulary-parallel path replaces
    them by ones that combine the ranks' shards: ``kdplug._vocab_parallel.ShardedRows``)."""

    @staticmethod
    def lse(x):
        """The row log-sum-exp from this block's ``[N, 1]`` log-sum-exps."""
        return x

    @staticmethod
    def sum(x):
        """The row sum from this block's ``[N, 1]`` sums."""
        return x


LOCAL = LocalRows()


class _Rows:
    """The log-probabilities of a block of rows, shared by the forward and the backward."""

    def __init__(self, lq, lp, lr, lr_tilde, params, structure, consts):
        self.lq, self.lp, self.lr, self.lr_tilde = lq, lp, lr, lr_tilde
        self.policy, self.has_assistant, self.detach, alpha, self.terms = _decode(structure, consts)
        params = params.to(lq.dtype)
        self.T, self.lam, self.weights = params[0], params[1], params[2:]
        self.a = (1.0 - alpha) / 2.0  # 0: the geometric mixture; < 0: a power mean (alpha > 1)
        # Under "exclude", an entry where either logit is +-inf is dropped (+inf never gets here).
        self.keep = (lq != NEG_INF) & (lp != NEG_INF) if self.policy == EXCLUDE else None

    @classmethod
    def compute(cls, student_logits, teacher_logits, params, row_mask, structure, consts, rows=LOCAL):
        dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
        T = params[0].to(dtype)
        zero = torch.zeros((), dtype=dtype, device=student_logits.device)
        keep_row = row_mask[:, None]
        # NB: masked rows are never read (they may hold NaN or be all -inf): they become zeros.
        s = torch.where(keep_row, student_logits.to(dtype), zero).div_(T)
        t = torch.where(keep_row, teacher_logits.to(dtype), zero).div_(T)
        logs, lses = [], []
        for name, x in (("student_logits", s), ("teacher_logits", t)):
            # log-softmax over the whole row (rows.lse combines the vocabulary shards, if any)
            lse = rows.lse(torch.logsumexp(x, dim=-1, keepdim=True))
            torch._assert_async(torch.isfinite(lse).all(), f"kdplug: {name} has a row that is not masked but "
                                "is all -inf, or holds +inf or NaN; mask such rows (mask= or labels=)")
            logs.append(x.sub_(lse))
            lses.append(lse)
        lq, lp = logs
        del s, t, logs
        policy, has_assistant, detach, alpha, terms = _decode(structure, consts)
        lr = lr_tilde = None
        if has_assistant:
            a = (1.0 - alpha) / 2.0
            lr_tilde = mixture_log(lp, lq, params[1].to(dtype), a)
            if a == 1.0:  # arithmetic mixture: already normalized
                lr = lr_tilde
            else:
                log_z = rows.lse(torch.logsumexp(lr_tilde, dim=-1, keepdim=True))
                # A mixture that is 0 everywhere (disjoint supports under a geometric mixture) is
                # left at 0 instead of 0/0.
                lr = lr_tilde - torch.where(log_z == NEG_INF, zero, log_z)
        block = cls(lq, lp, lr, lr_tilde, params, structure, consts)
        block.lse = torch.cat(lses, dim=1)  # [N, 2]: LSE(s / T), LSE(t / T), as row_stats[:, :2]
        return block

    def logs(self, operand):
        return (self.lp, self.lq, self.lr)[operand]

    def terms_iter(self, token_weights, partials):
        """Yields (e, dP, dQ, lhs, rhs, coefficient [n, 1]) per term."""
        for i, (lhs, rhs, div, ab_a, ab_b) in enumerate(self.terms):
            e, dP, dQ = element(div, self.logs(lhs), self.logs(rhs), ab_a, ab_b, partials)
            if self.keep is not None:
                zero = torch.zeros((), dtype=e.dtype, device=e.device)
                e, dP, dQ = (None if x is None else torch.where(self.keep, x, zero) for x in (e, dP, dQ))
            coef = self.weights[i].reshape(1, 1)
            if token_weights is not None:
                coef = coef * token_weights[:, i: i + 1].to(e.dtype)
            yield e, dP, dQ, lhs, rhs, coef


def forward(rows, token_weights, row_mask, reduce=LOCAL):
    """Per-token loss ``[N]`` (0 on masked rows)."""
    loss = torch.zeros_like(rows.lq[:, :1])
    for e, _, _, _, _, coef in rows.terms_iter(token_weights, partials=False):
        loss = loss + _mul0(coef, reduce.sum(e.sum(dim=-1, keepdim=True)))
    loss = loss.squeeze(-1)
    return torch.where(row_mask, loss, torch.zeros_like(loss))


def backward(grad_loss, rows, token_weights, row_mask, dtypes, need_teacher: bool, reduce=LOCAL):
    """Gradients w.r.t. the student (and teacher) logits: ``scale * (u - q * sum(u)) / T``."""
    dtype = rows.lq.dtype
    zero = torch.zeros((), dtype=dtype, device=rows.lq.device)
    via_assistant = rows.has_assistant and not rows.detach
    needed = {STUDENT, TEACHER} if need_teacher else {STUDENT}
    if via_assistant:
        needed.add(ASSISTANT)
    h = {}  # slot -> dL/dlog(slot)
    for _, dP, dQ, lhs, rhs, coef in rows.terms_iter(token_weights, partials=True):
        for slot, partial in ((lhs, dP), (rhs, dQ)):
            if slot not in needed:
                continue
            # NB: an infinite partial only occurs where the element itself is +inf (a genuine
            # support mismatch); such a token's gradient is taken over its finite entries.
            partial = torch.nan_to_num(partial, nan=0.0, posinf=0.0, neginf=0.0)
            partial = _mul0(coef, partial)
            h[slot] = partial if slot not in h else h[slot].add_(partial)
    scale = torch.where(row_mask, grad_loss.to(dtype), zero)[:, None] / rows.T
    live = scale != 0

    def grad(side, side_log, side_weight, out_dtype):
        u = h.get(side, torch.zeros_like(side_log))
        if via_assistant and ASSISTANT in h:
            h_r = h[ASSISTANT]
            r = torch.exp(rows.lr)
            w = _mixture_weight(side_log, rows.lr_tilde, side_weight, rows.a)
            u = u + w * (h_r - reduce.sum(h_r.sum(dim=-1, keepdim=True)) * r)
        prob = torch.exp(side_log)
        g = (u - prob * reduce.sum(u.sum(dim=-1, keepdim=True))).mul_(scale)
        # NB: the gradient w.r.t. a -inf logit is 0, and a token whose incoming gradient is 0
        # gets exactly 0 (its loss may be +inf).
        g = torch.where(live & (side_log != NEG_INF), g, zero)
        return g.to(out_dtype)

    grad_student = grad(STUDENT, rows.lq, 1 - rows.lam, dtypes[0])
    grad_teacher = grad(TEACHER, rows.lp, rows.lam, dtypes[1]) if need_teacher else None
    return grad_student, grad_teacher


# Rows per block of the PyTorch path: its temporaries (a dozen or two per block, log-probabilities,
# mixtures, partials) are a block's size instead of N x V each; the backward recomputes a block's
# log-probabilities instead of keeping them from the forward. One block for vocabulary shards
# (every rank must make the same collective calls, and uneven shards would give uneven blocks)
# and under torch.compile (no graph unrolled over blocks).
_BLOCK_BYTES = 8 << 20


def _blocks(n: int, width: int, rows) -> list[slice]:
    if rows is not LOCAL or n == 0 or torch.compiler.is_compiling():
        return [slice(0, n)]
    step = max(1, _BLOCK_BYTES // (4 * max(width, 1)))
    return [slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _block(x, rows: slice):
    return None if x is None else x[rows]


class RecipeLoss(torch.autograd.Function):
    """Per-token recipe loss with the closed-form gradient (first order only).

    ``apply(student_logits, teacher_logits, params, token_weights, row_mask, structure, consts,
    rows=None, inplace=False) -> (loss [N], lse [N, 2])``: ``rows`` combines the row reductions of
    vocabulary shards (the vocabulary-parallel path; None: ``LOCAL``); ``inplace`` writes the
    student's gradient over ``student_logits``; ``lse`` (not differentiable) holds each row's
    ``LSE(s / T)``, ``LSE(t / T)``. Rows are evaluated in blocks (``_blocks``).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, params, token_weights, row_mask, structure, consts,
                rows=None, inplace=False):
        rows = LOCAL if rows is None else rows
        losses, lses = [], []
        for sl in _blocks(student_logits.shape[0], student_logits.shape[-1], rows):
            block = _Rows.compute(student_logits[sl], teacher_logits[sl], params, row_mask[sl], structure, consts,
                                  rows)
            losses.append(forward(block, _block(token_weights, sl), row_mask[sl], rows))
            lses.append(block.lse)
        loss, lse = torch.cat(losses), torch.cat(lses)
        ctx.save_for_backward(student_logits, teacher_logits, params, token_weights, row_mask)
        ctx.structure, ctx.consts, ctx.rows, ctx.inplace = structure, consts, rows, inplace
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        student_logits, teacher_logits, params, token_weights, row_mask = ctx.saved_tensors
        dtypes = (student_logits.dtype, teacher_logits.dtype)
        need_student, need_teacher = ctx.needs_input_grad[:2]
        grad_s = grad_t = None
        if need_student:
            grad_s = student_logits if ctx.inplace else torch.empty(
                student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
        if need_teacher:
            grad_t = torch.empty(teacher_logits.shape, dtype=teacher_logits.dtype, device=teacher_logits.device)
        for sl in _blocks(student_logits.shape[0], student_logits.shape[-1], ctx.rows):
            # NB: in place, a block's logits are read (here) before its gradient overwrites them
            block = _Rows.compute(student_logits[sl], teacher_logits[sl], params, row_mask[sl], ctx.structure,
                                  ctx.consts, ctx.rows)
            gs, gt = backward(grad_loss[sl], block, _block(token_weights, sl), row_mask[sl], dtypes, need_teacher,
                              ctx.rows)
            if need_student:
                grad_s[sl] = gs
            if need_teacher:
                grad_t[sl] = gt
        return grad_s, grad_t, None, None, None, None, None, None, None
