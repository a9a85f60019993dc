"""Float64 reference implementations of every built-in kdplug method.

Written directly from the formulas of the research notes
(``research/methods-kl-family.md`` and ``research/methods-ab-taid-amid.md``) and DESIGN §2.
This module imports nothing from kdplug: it is the independent spec the tests compare against.

Conventions (the notes' notation):

* teacher ``p = softmax(t / T)``, student ``q = softmax(s / T)``, all in float64 and in log space
  (``lp``, ``lq``); temperature divides both logit rows.
* ``inf_policy="exact"``: a ``-inf`` logit is probability 0, ``0 log 0 = 0``, a vocabulary entry
  where both arguments of the divergence are 0 contributes 0, a genuine support mismatch
  (e.g. KL(p||q) with ``q_k = 0 < p_k``) is ``+inf``.
* ``inf_policy="exclude"``: an entry where the student or the teacher logit is infinite is
  dropped from every vocabulary sum of the divergence; the normalizers (the softmaxes, AMiD's
  ``sum r~``) still run over the full row.

Support (for "exact") is decided by the log-probability: an entry is 0 only when its logit is
-inf, never because exp() underflowed; the tests avoid inputs where that distinction matters
(a -inf logit on one side facing an underflowing probability on the other).

Every function is written so that torch.autograd gives the exact gradient with respect to the
student logits wherever the token's loss is finite (select-before-multiply: no ``0 * inf`` is
ever formed in a branch that is live or differentiated), so the tests use autograd on this
module as the reference gradient. Masked tokens are never read (their logits are replaced by
zeros before anything is computed) and get the value 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

INF = math.inf

# The documented defaults of every built-in method (from the brief / research notes; tests check
# that kdplug advertises the same ones).
DEFAULTS: dict[str, dict] = {
    "fkl": dict(form="kl"),
    "rkl": dict(),
    "symmetric_kl": dict(lam=0.9, form="kl"),
    "tvd": dict(),
    "gjsd": dict(beta=0.5, normalized=False),
    "skl": dict(alpha=0.1, form="kl"),
    "srkl": dict(alpha=0.1, detach_mixture=False),
    "abkd": dict(alpha=0.2, beta=0.7, limit_scale="continuous"),
    "akl": dict(mu=0.5, variant="official"),
    "taid": dict(t_start=0.4, t_end=1.0, step_size=5e-4, momentum=0.99, adaptive=True,
                 total_steps=None, value="ce", update_every="step"),
    "amid": dict(alpha=0.5, lam=0.5, divergence="ab", order="pr", ab_alpha=0.2, ab_beta=0.7,
                 alpha_ge_1="geometric"),
    "distillm2": dict(alpha_1=0.1, alpha_2=0.1, beta=1.0),
}


# ------------------------------------------------------------------------------------------------
# Per-element divergences between two log-probability rows lP, lX (same shape [N, V]).
# ``keep`` is the kept-entry mask (all True under "exact").
# ------------------------------------------------------------------------------------------------
def _z(x):
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _sup(l):
    return l > -INF


def kl_sum(lP, lQ, keep):
    """sum_k P_k (log P_k - log Q_k), exact limits."""
    sP, sQ = _sup(lP), _sup(lQ)
    ok = keep & sP & sQ
    lPs = torch.where(ok, lP, _z(lP))
    lQs = torch.where(ok, lQ, _z(lQ))
    val = torch.where(ok, lPs.exp() * (lPs - lQs), _z(lP))
    mismatch = keep & sP & ~sQ
    return val.sum(-1) + torch.where(mismatch.any(-1), INF, 0.0)


def ce_sum(lP, lQ, keep):
    """-sum_k P_k log Q_k, exact limits."""
    sP, sQ = _sup(lP), _sup(lQ)
    ok = keep & sP & sQ
    lPs = torch.where(ok, lP, _z(lP))
    lQs = torch.where(ok, lQ, _z(lQ))
    val = torch.where(ok, -lPs.exp() * lQs, _z(lP))
    mismatch = keep & sP & ~sQ
    return val.sum(-1) + torch.where(mismatch.any(-1), INF, 0.0)


def tvd_sum(lP, lQ, keep):
    """sum_k |P_k - Q_k| / 2."""
    val = 0.5 * (lP.exp() - lQ.exp()).abs()
    return torch.where(keep, val, _z(val)).sum(-1)


def ab_sum(lP, lQ, keep, a, b):
    """Alpha-beta divergence D_AB^{(a,b)}(P||Q) (research ab-taid-amid §2.1), a, b >= 0, with the
    continuous normalization at the limits a = 0, b = 0, a = b = 0."""
    sP, sQ = _sup(lP), _sup(lQ)
    both = sP & sQ
    lPs = torch.where(sP, lP, _z(lP))
    lQs = torch.where(sQ, lQ, _z(lQ))
    zero = _z(lP)
    if a > 0 and b > 0:
        k = a + b
        t1 = torch.where(both, torch.exp(a * lPs + b * lQs), zero)
        t2 = torch.where(sP, torch.exp(k * lPs), zero)
        t3 = torch.where(sQ, torch.exp(k * lQs), zero)
        val = -(t1 - (a / k) * t2 - (b / k) * t3) / (a * b)
        return torch.where(keep, val, zero).sum(-1)
    if a == 0 and b > 0:
        # 1/b^2 sum [ Q^b log(Q^b/P^b) - Q^b + P^b ]
        ok = keep & both
        t1 = torch.where(ok, b * torch.exp(b * lQs) * (lQs - lPs), zero)
        t2 = torch.where(keep & sQ, torch.exp(b * lQs), zero)
        t3 = torch.where(keep & sP, torch.exp(b * lPs), zero)
        inf = (keep & sQ & ~sP).any(-1)
        return (t1 - t2 + t3).sum(-1) / b ** 2 + torch.where(inf, INF, 0.0)
    if b == 0 and a > 0:
        # 1/a^2 sum [ P^a log(P^a/Q^a) - P^a + Q^a ]
        ok = keep & both
        t1 = torch.where(ok, a * torch.exp(a * lPs) * (lPs - lQs), zero)
        t2 = torch.where(keep & sP, torch.exp(a * lPs), zero)
        t3 = torch.where(keep & sQ, torch.exp(a * lQs), zero)
        inf = (keep & sP & ~sQ).any(-1)
        return (t1 - t2 + t3).sum(-1) / a ** 2 + torch.where(inf, INF, 0.0)
    if a == 0 and b == 0:
        ok = keep & both
        val = torch.where(ok, 0.5 * (lPs - lQs) ** 2, zero)
        inf = (keep & (sP ^ sQ)).any(-1)
        return val.sum(-1) + torch.where(inf, INF, 0.0)
    raise ValueError("reference ab_sum: a, b must be >= 0")


def log_mix(w, lP, lQ):
    """log(w P + (1 - w) Q) in log space (arithmetic mixture, w = weight of P)."""
    if w == 0:
        return lQ
    if w == 1:
        return lP
    none = ~(_sup(lP) | _sup(lQ))
    x = math.log(w) + lP
    y = math.log1p(-w) + lQ
    x = torch.where(none, _z(x), x)
    y = torch.where(none, _z(y), y)
    return torch.where(none, -INF, torch.logaddexp(x, y))


# ------------------------------------------------------------------------------------------------
# Context for one batch of rows
# ------------------------------------------------------------------------------------------------
class Rows:
    """Float64 rows of one call: raw (masked-substituted) logits, log-probabilities, kept set."""

    def __init__(self, s, t, T, inf_policy, row_mask):
        m = row_mask[:, None]
        self.s = torch.where(m, s, _z(s))
        self.t = torch.where(m, t, _z(t))
        self.T = float(T)
        self.lq = torch.log_softmax(self.s / self.T, dim=-1)
        self.lp = torch.log_softmax(self.t / self.T, dim=-1)
        if inf_policy == "exact":
            self.keep = torch.ones_like(self.s, dtype=torch.bool)
        elif inf_policy == "exclude":
            self.keep = torch.isfinite(self.s) & torch.isfinite(self.t)
        else:
            raise ValueError(inf_policy)


def _divergence(kind, lX, lY, keep, ab=None):
    if kind == "kl":
        return kl_sum(lX, lY, keep)
    if kind == "ce":
        return ce_sum(lX, lY, keep)
    if kind == "ab":
        return ab_sum(lX, lY, keep, *ab)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------
# The methods: f(rows, flags, **params) -> per-token loss [N]
# ------------------------------------------------------------------------------------------------
def m_fkl(R, flags, form):
    return _divergence(form, R.lp, R.lq, R.keep)


def m_rkl(R, flags):
    return kl_sum(R.lq, R.lp, R.keep)


def m_symmetric_kl(R, flags, lam, form):
    out = torch.zeros(R.s.shape[0], dtype=R.s.dtype)
    if lam != 1:  # a term of weight 0 contributes nothing (even where it would be +inf)
        out = out + (1 - lam) * _divergence(form, R.lp, R.lq, R.keep)
    if lam != 0:
        out = out + lam * kl_sum(R.lq, R.lp, R.keep)
    return out


def m_tvd(R, flags):
    return tvd_sum(R.lp, R.lq, R.keep)


def m_gjsd(R, flags, beta, normalized):
    if beta == 0:
        return kl_sum(R.lp, R.lq, R.keep)
    if beta == 1:
        return kl_sum(R.lq, R.lp, R.keep)
    lm = log_mix(beta, R.lp, R.lq)
    val = beta * kl_sum(R.lp, lm, R.keep) + (1 - beta) * kl_sum(R.lq, lm, R.keep)
    if normalized:
        val = val / (beta * (1 - beta))
    return val


def m_skl(R, flags, alpha, form):
    lm = log_mix(alpha, R.lp, R.lq)
    return _divergence(form, R.lp, lm, R.keep)


def m_srkl(R, flags, alpha, detach_mixture):
    lq_mix = R.lq.detach() if detach_mixture else R.lq
    lm = log_mix(alpha, lq_mix, R.lp)
    return kl_sum(R.lq, lm, R.keep)


def m_abkd(R, flags, alpha, beta, limit_scale):
    val = ab_sum(R.lp, R.lq, R.keep, alpha, beta)
    if limit_scale == "abkd_repo":
        if alpha == 0 and beta != 0:
            val = val * beta
        elif beta == 0 and alpha != 0:
            val = val * alpha
    elif limit_scale != "continuous":
        raise ValueError(limit_scale)
    return val


def akl_weights(lp, lq, mu, variant):
    """(w_head, w_tail) per row, float64 numpy, from the notes' §8 (stable sorts, all entries)."""
    p = lp.detach().exp().cpu().numpy()
    hi = torch.maximum(lp, lq).detach().cpu().numpy()
    lo = torch.minimum(lp, lq).detach().cpu().numpy()
    # |p - q| = e^hi (1 - e^(lo - hi)): no cancellation where both are near 1 (0 where both are 0)
    with np.errstate(invalid="ignore"):
        gaps = np.where(hi == -np.inf, 0.0, np.exp(hi) * -np.expm1(lo - hi))
    out = np.zeros((p.shape[0], 2))
    for n in range(p.shape[0]):
        gap = gaps[n]
        V = p.shape[1]
        head = np.zeros(V, dtype=bool)
        if variant == "official":
            order = sorted(range(V), key=lambda k: (-p[n, k], k))   # descending, lower index first
            c = 0.0
            for j, k in enumerate(order):
                c += p[n, k]
                if c <= mu or j == 0:
                    head[k] = True
        elif variant == "kdflow":
            order = sorted(range(V), key=lambda k: (p[n, k], k))    # ascending, lower index first
            c = 0.0
            tail = np.zeros(V, dtype=bool)
            for k in order:
                c += p[n, k]
                if c <= mu:
                    tail[k] = True
            head = ~tail
        else:
            raise ValueError(variant)
        gh, gt = gap[head].sum(), gap[~head].sum()
        if gh + gt == 0:
            out[n] = (0.5, 0.5)
        else:
            out[n] = (gh / (gh + gt), gt / (gh + gt))
    return torch.from_numpy(out)


def m_akl(R, flags, mu, variant):
    w = akl_weights(R.lp, R.lq, mu, variant).to(R.s.dtype)
    return w[:, 0] * kl_sum(R.lp, R.lq, R.keep) + w[:, 1] * kl_sum(R.lq, R.lp, R.keep)


def taid_log_r(R, t):
    """log r_t, r_t = softmax(((1 - t) s + t teacher) / T), no gradient; t >= 1: p, t <= 0: q."""
    with torch.no_grad():
        if t >= 1:
            return R.lp.detach().clone()
        if t <= 0:
            return R.lq.detach().clone()
        return torch.log_softmax(((1 - t) * R.s.detach() + t * R.t.detach()) / R.T, dim=-1)


def m_taid(R, flags, t_start, t_end, step_size, momentum, adaptive, total_steps, value, update_every,
           t=None):
    t = t_start if t is None else t
    lr = taid_log_r(R, t)
    return _divergence(value, lr, R.lq, R.keep)


def amid_log_r(lp, lq, alpha, lam, alpha_ge_1):
    """log r of AMiD (notes §4.1): r~ = (lam p^a + (1-lam) q^a)^(1/a), a = (1-alpha)/2, r = r~/sum r~;
    alpha = 1 (and alpha > 1 with "geometric"): r ∝ p^lam q^(1-lam). Not detached."""
    if lam == 0:
        return lq
    if lam == 1:
        return lp
    sP, sQ = _sup(lp), _sup(lq)
    lps = torch.where(sP, lp, _z(lp))
    lqs = torch.where(sQ, lq, _z(lq))
    if alpha == 1 or (alpha > 1 and alpha_ge_1 == "geometric"):
        both = sP & sQ
        lrt = torch.where(both, lam * lps + (1 - lam) * lqs, -INF)
    else:
        a = (1 - alpha) / 2
        if a > 0:
            none = ~(sP | sQ)
            x = torch.where(sP, math.log(lam) + a * lps, -INF)
            y = torch.where(sQ, math.log1p(-lam) + a * lqs, -INF)
            x = torch.where(none, _z(x), x)
            y = torch.where(none, _z(y), y)
            lrt = torch.where(none, -INF, torch.logaddexp(x, y) / a)
        else:  # a < 0: power mean with a negative exponent; r~ = 0 where either side is 0
            both = sP & sQ
            x = math.log(lam) + a * lps
            y = math.log1p(-lam) + a * lqs
            lrt = torch.where(both, torch.logaddexp(x, y) / a, -INF)
    return lrt - torch.logsumexp(lrt, dim=-1, keepdim=True)


def m_amid(R, flags, alpha, lam, divergence, order, ab_alpha, ab_beta, alpha_ge_1):
    lr = amid_log_r(R.lp, R.lq, alpha, lam, alpha_ge_1)
    ops = {"p": R.lp, "q": R.lq, "r": lr}
    X, Y = ops[order[0]], ops[order[1]]
    if divergence == "kl":
        return kl_sum(X, Y, R.keep)
    if divergence == "ab":
        return ab_sum(X, Y, R.keep, ab_alpha, ab_beta)
    raise ValueError(divergence)


def m_distillm2(R, flags, alpha_1, alpha_2, beta):
    if flags is None:
        raise ValueError("distillm2 needs student_generated flags")
    zero = torch.zeros(R.s.shape[0], dtype=R.s.dtype)
    teacher_side = zero
    student_side = zero
    if beta != 2:
        teacher_side = (2 - beta) * kl_sum(R.lp, log_mix(alpha_1, R.lp, R.lq), R.keep)
    if beta != 0:
        student_side = beta * kl_sum(R.lq, log_mix(alpha_2, R.lq.detach(), R.lp), R.keep)
    return torch.where(flags, student_side, teacher_side)


REFERENCE = {
    "fkl": m_fkl,
    "rkl": m_rkl,
    "symmetric_kl": m_symmetric_kl,
    "tvd": m_tvd,
    "gjsd": m_gjsd,
    "skl": m_skl,
    "srkl": m_srkl,
    "abkd": m_abkd,
    "akl": m_akl,
    "taid": m_taid,
    "amid": m_amid,
    "distillm2": m_distillm2,
}


def per_token(name, s, t, *, temperature=1.0, inf_policy="exact", mask=None, student_generated=None,
              **params):
    """Per-token reference loss (float64, the leading shape, masked tokens exactly 0).

    ``s`` (student logits, may require grad) and ``t`` (teacher) are [..., V]; they are cast to
    float64. ``taid`` accepts ``taid_t=`` to fix the interpolation weight (default: ``t_start``).
    """
    if name not in REFERENCE:
        raise KeyError(f"no reference implementation for method {name!r}")
    full = dict(DEFAULTS[name])
    taid_t = params.pop("taid_t", None)
    unknown = set(params) - set(full)
    if unknown:
        raise TypeError(f"reference {name}: unknown params {sorted(unknown)}")
    full.update(params)
    if name == "taid":
        full["t"] = taid_t
    s = s.to(torch.float64)
    t = t.to(torch.float64)
    lead = tuple(s.shape[:-1])
    V = s.shape[-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool)
    row_mask = mask.reshape(-1).bool()
    flags = None
    if student_generated is not None:
        flags = torch.as_tensor(student_generated).bool()
        flags = flags.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    R = Rows(s.reshape(-1, V), t.reshape(-1, V), temperature, inf_policy, row_mask)
    val = REFERENCE[name](R, flags, **full)
    val = torch.where(row_mask, val, torch.zeros((), dtype=val.dtype))
    return val.reshape(lead)


def reduce(per_tok, mask, reduction, num_items=None):
    """The reductions of the public API, written from their definitions."""
    lead = per_tok.shape
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool)
    mask = mask.bool()
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    if reduction == "mean":
        den = num_items if num_items is not None else max(int(mask.sum()), 1)
        return per_tok.sum() / den
    if reduction == "batchmean":
        den = num_items if num_items is not None else lead[0]
        return per_tok.sum() / den
    if reduction == "sequence":
        B = lead[0]
        total = 0.0
        for i in range(B):
            cnt = int(mask[i].sum())
            if cnt > 0:
                total = total + per_tok[i].sum() / cnt
        den = num_items if num_items is not None else B
        return total / den
    raise ValueError(reduction)


# ------------------------------------------------------------------------------------------------
# TAID schedule (research ab-taid-amid §3.3), plain Python
# ------------------------------------------------------------------------------------------------
class TaidRecurrence:
    def __init__(self, t_start=0.4, t_end=1.0, step_size=5e-4, momentum=0.99, adaptive=True,
                 total_steps=None):
        self.t_start, self.t_end = t_start, t_end
        self.alpha, self.beta = step_size, momentum
        self.adaptive, self.total = adaptive, total_steps
        self.t = t_start
        self.prev_loss = INF
        self.m = 0.0

    def t_lin(self, global_step):
        if self.total is None:
            return self.t_start
        return self.t_start + (self.t_end - self.t_start) * global_step / self.total

    def update(self, loss, global_step):
        if not self.adaptive:
            self.t = min(self.t_end, self.t_lin(global_step))
            return
        if self.prev_loss == INF:
            self.prev_loss = loss
            return
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.m = self.beta * self.m + (1 - self.beta) * rel
        delta = self.alpha * (1 / (1 + math.exp(-self.m))) * (1 - self.t)
        self.t = min(self.t_end, max(self.t_lin(global_step), self.t + delta))
        self.prev_loss = loss


def synthetic_losses(n=300):
    return [0.5 + 2 * math.exp(-k / 80) + 0.05 * math.sin(k / 3) for k in range(n)]


# ------------------------------------------------------------------------------------------------
# Test inputs and comparison helpers (no kdplug import: they take kdplug's outputs as tensors)
# ------------------------------------------------------------------------------------------------
INF_KINDS = ("finite", "shared_inf", "teacher_inf", "student_inf", "mixed_inf", "extreme")


def make_logits(shape, kind="finite", seed=0, scale=2.0, peak=8.0):
    """Student and teacher logits (float64) of the given shape [..., V] and kind.

    finite: N(0, scale^2), a third of the teacher rows peaked (+peak on one entry).
    shared_inf: the last ~V/4 vocabulary columns are -inf in both (vocabulary padding).
    teacher_inf / student_inf: in about half the rows ~30 % of the entries are -inf on that side.
    mixed_inf: shared padding columns plus independent one-sided -inf on both sides.
    extreme: logits of -1e4 (on either or both sides) and +1e4 (one entry of some rows).
    Every row keeps at least two entries that are finite on both sides.
    """
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    N = s2.shape[0]
    peak_rows = torch.rand(N, generator=g) < 0.33
    peak_at = torch.randint(0, V, (N,), generator=g)
    t2[peak_rows, peak_at[peak_rows]] += peak
    if kind == "finite" or V < 3:
        return s, t
    # two protected columns per row, finite on both sides
    protect = torch.zeros(N, V, dtype=torch.bool)
    for n in range(N):
        protect[n, torch.randperm(V, generator=g)[:2]] = True

    def rand_mask(frac, rows_frac=0.5):
        rows = torch.rand(N, 1, generator=g) < rows_frac
        return (torch.rand(N, V, generator=g) < frac) & rows & ~protect

    ninf = -INF
    if kind in ("shared_inf", "mixed_inf"):
        k = max(1, V // 4)
        cols = torch.zeros(N, V, dtype=torch.bool)
        cols[:, V - k:] = True
        cols &= ~protect
        s2[cols] = ninf
        t2[cols] = ninf
    if kind in ("teacher_inf", "mixed_inf"):
        t2[rand_mask(0.3)] = ninf
    if kind in ("student_inf", "mixed_inf"):
        s2[rand_mask(0.3)] = ninf
    if kind == "extreme":
        both = rand_mask(0.2, 1.0)
        s2[both] = -1e4
        t2[both] = -1e4
        s2[rand_mask(0.2)] = -1e4
        t2[rand_mask(0.2)] = -1e4
        for x in (s2, t2):
            rows = torch.nonzero(torch.rand(N, generator=g) < 0.4).flatten()
            for n in rows.tolist():
                x[n, torch.randint(0, V, (1,), generator=g)] = 1e4
    elif kind not in ("shared_inf", "teacher_inf", "student_inf", "mixed_inf"):
        raise ValueError(kind)
    return s, t


def random_mask(lead, seed=0, frac_false=0.25):
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(lead, generator=g) >= frac_false
    return m


def random_weights(lead, seed=0):
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.rand(lead, generator=g, dtype=torch.float64) + 0.5


def magnitude(s, t, T):
    """Per-token natural scale of a loss value: sum_k (p + q)(1 + |log p| + |log q|) over the
    entries where both are finite (the size of the terms that cancel inside a divergence)."""
    lq = torch.log_softmax(s.double() / T, -1)
    lp = torch.log_softmax(t.double() / T, -1)
    fin = torch.isfinite(lq) & torch.isfinite(lp)
    x = (lp.exp() + lq.exp()) * (1 + lp.abs() + lq.abs())
    return torch.where(fin, x, torch.zeros((), dtype=x.dtype)).sum(-1)


def loss_problems(got, ref, mag, rtol, mag_tol):
    """Differences between per-token losses: NaN, +inf pattern, values out of tolerance."""
    got = got.detach().double()
    ref = ref.detach().double()
    msgs = []
    if torch.isnan(got).any():
        msgs.append(f"NaN loss at tokens {torch.nonzero(torch.isnan(got)).tolist()[:5]}")
    if not torch.equal(torch.isinf(got), torch.isinf(ref)):
        msgs.append(f"+inf pattern differs: expected inf at {torch.nonzero(torch.isinf(ref)).tolist()[:5]}, "
                    f"got inf at {torch.nonzero(torch.isinf(got)).tolist()[:5]}")
    fin = torch.isfinite(ref) & torch.isfinite(got)
    tol = rtol * ref.abs() + mag_tol * mag
    bad = fin & ((got - ref).abs() > tol)
    if bad.any():
        idx = torch.nonzero(bad)[:3].tolist()
        for i in idx:
            i = tuple(i)
            msgs.append(f"loss[{i}] expected {ref[i].item():.12g} got {got[i].item():.12g}")
    return msgs


def grad_scale(s, t, T, w):
    """Per-entry natural scale of a gradient entry: (w/T) (p_k + q_k) (1 + |log p_k| + |log q_k| + M)
    with M the row's magnitude(); fp rounding of the logit row (e.g. of s/T at |s/T| ~ 1e5)
    perturbs a gradient entry by about eps times this."""
    lq = torch.log_softmax(s.double() / T, -1)
    lp = torch.log_softmax(t.double() / T, -1)
    z = torch.zeros((), dtype=torch.float64)
    alq = torch.where(torch.isfinite(lq), lq.abs(), z)
    alp = torch.where(torch.isfinite(lp), lp.abs(), z)
    M = magnitude(s, t, T)[..., None]
    return (w.double()[..., None] / T) * (lp.exp() + lq.exp()) * (1 + alq + alp + M)


def grad_problems(got, ref, row_ok, w, T, rtol, atol_rel, tiny=0.0, scale=None):
    """Differences between gradients [..., V] on the rows where row_ok (finite loss); tolerance
    rtol*|ref| + atol_rel*(max_row|ref| + w/T + scale) + tiny."""
    got = got.detach().double()
    ref = ref.detach().double()
    msgs = []
    if torch.isnan(got).any():
        msgs.append(f"NaN gradient at {torch.nonzero(torch.isnan(got)).tolist()[:5]}")
    V = got.shape[-1]
    g2, r2 = got.reshape(-1, V), ref.reshape(-1, V)
    ok = row_ok.reshape(-1)
    wr = w.reshape(-1).double()
    if torch.isnan(r2[ok]).any() or torch.isinf(r2[ok]).any():
        msgs.append("REFERENCE gradient not finite on a finite-loss row (reference bug)")
        return msgs
    rowmax = r2.abs().amax(-1, keepdim=True)
    extra = 0.0 if scale is None else scale.reshape(-1, V)
    tol = rtol * r2.abs() + atol_rel * (rowmax + wr[:, None] / T + extra) + tiny
    bad = (g2 - r2).abs() > tol
    bad &= ok[:, None]
    if bad.any():
        for n, k in torch.nonzero(bad)[:4].tolist():
            msgs.append(f"grad[row {n}, {k}] expected {r2[n, k].item():.12g} got {g2[n, k].item():.12g}")
    return msgs
