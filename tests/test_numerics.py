"""Numerical robustness and API contracts: no NaN on the hard inputs of DESIGN §2, masked tokens
never read, zero incoming gradient gives an exactly zero gradient, gradcheck, reductions,
t2_scale, and the error cases.
"""
from __future__ import annotations

import pytest
import torch

import kdplug
from _common import BACKENDS, METHODS, single_thread  # noqa: F401 (single_thread applies itself)
import reference as ref



NINF = float("-inf")





# defaults plus the settings whose value can be +inf or that sit on a branch boundary
ROBUST = [(m, {}) for m in METHODS] + [
    ("fkl", dict(form="ce")), ("symmetric_kl", dict(lam=1.0)), ("gjsd", dict(beta=0.0)), ("gjsd", dict(beta=1.0)),
    ("skl", dict(alpha=0.0)), ("srkl", dict(alpha=0.0)), ("srkl", dict(alpha=0.3, detach_mixture=True)),
    ("abkd", dict(alpha=1.0, beta=0.0)), ("abkd", dict(alpha=0.0, beta=1.0)), ("abkd", dict(alpha=0.0, beta=0.0)),
    ("abkd", dict(alpha=1.5, beta=0.3)), ("akl", dict(variant="kdflow")),
    ("taid", dict(t_start=1.0, t_end=1.0)), ("taid", dict(t_start=0.0, t_end=0.0, value="kl")),
    ("amid", dict(alpha=1.0, divergence="kl")), ("amid", dict(alpha=-3.0, order="qr")),
    ("amid", dict(alpha=2.0, alpha_ge_1="power_mean", order="rq")), ("amid", dict(alpha=0.5, lam=0.0)),
    ("distillm2", dict(alpha_1=0.0, alpha_2=0.0)),
]


def _flags(name, lead):
    if name != "distillm2":
        return {}
    f = torch.zeros(lead[:1], dtype=torch.bool)
    f[::2] = True
    return {"student_generated": f}


def _pid(n, p):
    return n + ("(" + ",".join(f"{k}={v}" for k, v in p.items()) + ")" if p else "")


HARD_INPUTS = [
    ("finite", torch.float16, 1.0), ("finite", torch.bfloat16, 0.05),
    ("shared_inf", torch.float16, 1.0), ("mixed_inf", torch.bfloat16, 2.0),
    ("mixed_inf", torch.float64, 1.0), ("extreme", torch.float32, 1.0), ("extreme", torch.float16, 1.0),
    ("extreme", torch.float64, 0.05), ("mixed_inf", torch.float32, 0.05), ("mixed_inf", torch.float32, 10.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,dtype,T", HARD_INPUTS, ids=[f"{k}-{str(d)[6:]}-T{T}" for k, d, T in HARD_INPUTS])
@pytest.mark.parametrize("name,params", ROBUST, ids=[_pid(n, p) for n, p in ROBUST])
def test_no_nan(name, params, kind, dtype, T, backend):
    s, t = ref.make_logits((2, 3, 17), kind, seed=41)
    s, t = s.to(dtype), t.to(dtype)
    for policy in ("exact", "exclude"):
        leaf = s.clone().requires_grad_(True)
        fn = kdplug.get(name, backend=backend, temperature=T, inf_policy=policy, reduction="none", **params)
        out = fn(leaf, t, **_flags(name, (2, 3)))
        assert not torch.isnan(out).any(), f"NaN loss ({policy}): {out}"
        if policy == "exact":  # (one-sided exclusions can make a restricted sum negative)
            assert (out[torch.isfinite(out)] > -1e-3).all(), "negative divergence"
        w = ref.random_weights((2, 3), 41).to(out.dtype)
        (out * w).sum().backward()
        g = leaf.grad
        assert not torch.isnan(g).any(), f"NaN gradient ({policy})"
        fin = torch.isfinite(out)
        if dtype == torch.float16 and name == "abkd" and params.get("alpha") == 0.0 == params.get("beta"):
            continue  # the log-Euclidean gradient of logits at -1e4 exceeds the float16 range
        assert torch.isfinite(g[fin]).all(), f"non-finite gradient on a token with a finite loss ({policy})"
        assert (g[fin][torch.isneginf(s[fin])] == 0).all(), "nonzero gradient at a -inf student logit"
        # the reduced losses are NaN-free too
        fn = kdplug.get(name, backend=backend, temperature=T, inf_policy=policy, reduction="sequence", **params)
        leaf = s.clone().requires_grad_(True)
        loss = fn(leaf, t, **_flags(name, (2, 3)))
        assert not torch.isnan(loss)
        loss.backward()
        assert not torch.isnan(leaf.grad).any()


UNDERFLOW = [("fkl", {}), ("fkl", dict(form="ce")), ("skl", dict(alpha=0.0)), ("abkd", dict(alpha=1.0, beta=0.0)),
             ("abkd", dict(alpha=0.3, beta=0.0)), ("abkd", dict(alpha=0.0, beta=0.0)), ("gjsd", dict(beta=0.0)),
             ("amid", dict(alpha=1.0, divergence="kl")),
             ("amid", dict(alpha=1.0, divergence="ab", ab_alpha=1.0, ab_beta=0.0)),
             ("taid", dict(t_start=1.0, t_end=1.0))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,gap", [(torch.float32, -120.0), (torch.float64, -800.0)], ids=["f32", "f64"])
@pytest.mark.parametrize("name,params", UNDERFLOW, ids=[_pid(n, p) for n, p in UNDERFLOW])
def test_underflowing_teacher_at_student_neginf_is_not_nan(name, params, dtype, gap, backend):
    """p_0 = e^gap/(1+e^gap) underflows to 0 in this dtype (its log does not) and q_0 = 0 (a -inf
    student logit). In exact arithmetic the divergence is +inf; the notes' kernel rule
    ("P == 0 ? 0 : P * x") may instead drop the underflowed entry. Either is accepted, NaN is not,
    and neither is a NaN gradient."""
    s = torch.tensor([[NINF, 0.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[gap, 0.0]], dtype=dtype)
    out = kdplug.get(name, backend=backend, reduction="none", **params)(s, t)
    assert not torch.isnan(out).any(), f"NaN loss (expected +inf or ~0): {out}"
    assert (out >= -1e-6).all()
    (g,) = torch.autograd.grad(out.sum(), s)
    assert not torch.isnan(g).any(), f"NaN gradient: {g}"
    if torch.isfinite(out).all():
        assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_srkl_alpha0_underflowing_teacher_gradient(backend):
    """srkl(alpha=0) = RKL: a teacher logit at -1e4 (p underflows, log p finite) gives a finite
    loss and must give the finite RKL gradient."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, -1e4]], dtype=torch.float64)
    a = kdplug.get("srkl", backend=backend, alpha=0.0, reduction="none")(s, t)
    (ga,) = torch.autograd.grad(a.sum(), s)
    b = kdplug.get("rkl", backend=backend, reduction="none")(s, t)
    (gb,) = torch.autograd.grad(b.sum(), s)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert not torch.isnan(ga).any(), f"NaN gradient {ga}"
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", ["nan", "neginf"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean", "sequence"])
@pytest.mark.parametrize("name", METHODS)
def test_fully_masked_batch(name, reduction, fill, backend):
    s = torch.full((2, 3, 7), float("nan") if fill == "nan" else NINF, requires_grad=True)
    t = torch.full((2, 3, 7), float("nan") if fill == "nan" else NINF)
    fn = kdplug.get(name, backend=backend, reduction=reduction)
    for kw in (dict(mask=torch.zeros(2, 3, dtype=torch.bool)), dict(labels=torch.full((2, 3), -100))):
        loss = fn(s, t, **kw, **_flags(name, (2, 3)))
        assert loss.requires_grad, "a fully masked loss must stay connected to the graph"
        assert (loss == 0).all() and not torch.isnan(loss).any()
        (g,) = torch.autograd.grad(loss.sum(), s)
        assert torch.equal(g, torch.zeros_like(s)), "fully masked batch: gradient not exactly zero"



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean", "sequence"])
@pytest.mark.parametrize("name", METHODS)
def test_empty_batch(name, reduction, backend):
    """No rows at all (a batch of 0 sequences): 0 for the scalar reductions, as a fully masked
    batch, never 0 / 0 (batchmean and sequence divide by the batch size)."""
    s = torch.randn(0, 3, 7, requires_grad=True)
    loss = kdplug.get(name, backend=backend, reduction=reduction)(s, torch.randn(0, 3, 7), **_flags(name, (0, 3)))
    assert loss.shape == ((0, 3) if reduction == "none" else ())
    assert (loss == 0).all() and loss.requires_grad
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert g.shape == s.shape

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", ["nan", "neginf", "posinf"])
@pytest.mark.parametrize("name", METHODS)
def test_masked_rows_are_not_read(name, fill, backend):
    s, t = ref.make_logits((3, 4, 10), "finite", seed=43)
    mask = ref.random_mask((3, 4), 43)
    mask[0, 0] = False
    value = {"nan": float("nan"), "neginf": NINF, "posinf": float("inf")}[fill]
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = value
    t_bad[~mask] = value
    s_bad[0, 0, 3] = 1.0  # a partly filled masked row
    for reduction in ("none", "mean", "sequence"):
        fn = kdplug.get(name, backend=backend, reduction=reduction)
        a = s.clone().requires_grad_(True)
        b = s_bad.clone().requires_grad_(True)
        la = fn(a, t, mask=mask, **_flags(name, (3, 4)))
        lb = fn(b, t_bad, mask=mask, **_flags(name, (3, 4)))
        assert torch.equal(la, lb), "the loss depends on masked rows"
        (ga,) = torch.autograd.grad(la.sum(), a)
        (gb,) = torch.autograd.grad(lb.sum(), b)
        assert torch.equal(ga, gb), "the gradient depends on masked rows"
        assert (gb[~mask] == 0).all()


INF_LOSS = [
    ("fkl", {}, "student"), ("fkl", dict(form="ce"), "student"), ("rkl", {}, "teacher"),
    ("symmetric_kl", {}, "student"), ("symmetric_kl", {}, "teacher"), ("gjsd", dict(beta=0.0), "student"),
    ("gjsd", dict(beta=1.0), "teacher"), ("skl", dict(alpha=0.0), "student"), ("srkl", dict(alpha=0.0), "teacher"),
    ("abkd", dict(alpha=1.0, beta=0.0), "student"), ("abkd", dict(alpha=0.0, beta=1.0), "teacher"),
    ("abkd", dict(alpha=0.0, beta=0.0), "student"), ("abkd", dict(alpha=0.3, beta=0.0), "student"),
    ("akl", {}, "student"), ("akl", {}, "teacher"), ("taid", dict(t_start=1.0, t_end=1.0), "student"),
    ("amid", dict(alpha=1.0, divergence="kl"), "student"), ("amid", dict(alpha=0.5, lam=0.0, divergence="kl"), "student"),
    ("distillm2", dict(alpha_1=0.0), "student"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy_dtype", [("exact", torch.float32), ("exact", torch.float64)])
@pytest.mark.parametrize("name,params,side", INF_LOSS, ids=[f"{_pid(n, p)}-{s}" for n, p, s in INF_LOSS])
def test_zero_weight_on_infinite_token_gives_exact_zero_gradient(name, params, side, policy_dtype, backend):
    policy, dtype = policy_dtype
    s, t = ref.make_logits((2, 3, 8), "finite", seed=44, peak=0.0)
    s, t = s.to(dtype), t.to(dtype)
    # token (0, 1): a support mismatch on one side, so its true loss is +inf
    if side == "student":
        s[0, 1, :3] = NINF
    else:
        t[0, 1, :3] = NINF
    fn = kdplug.get(name, backend=backend, reduction="none", inf_policy=policy, **params)
    flags = {"student_generated": torch.tensor([False, True])} if name == "distillm2" else {}
    leaf = s.clone().requires_grad_(True)
    out = fn(leaf, t, **flags)
    assert torch.isinf(out[0, 1]) and out[0, 1] > 0, f"expected +inf loss on the mismatched token, got {out[0, 1]}"
    assert torch.isfinite(out[0, 0]) and torch.isfinite(out[1]).all()
    w = torch.ones_like(out)
    w[0, 1] = 0
    (g,) = torch.autograd.grad((out * w).sum(), leaf, retain_graph=True)
    assert not torch.isnan(g).any()
    assert (g[0, 1] == 0).all(), f"token with zero incoming gradient: gradient {g[0, 1]}"
    # and the other tokens get exactly the gradient they get alone
    (g2,) = torch.autograd.grad(out[0, 0] + out[0, 2] + out[1].sum(), leaf)
    assert torch.equal(g, g2)
    # masking the token instead: loss finite, gradient zero there
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    fn_mean = kdplug.get(name, backend=backend, reduction="mean", inf_policy=policy, **params)
    leaf = s.clone().requires_grad_(True)
    loss = fn_mean(leaf, t, mask=mask, **flags)
    assert torch.isfinite(loss)
    loss.backward()
    assert (leaf.grad[0, 1] == 0).all() and torch.isfinite(leaf.grad).all()


# --------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------
def _gradcheck_params(name):
    # TAID's assistant is detached by design (its gradient is not the derivative of its value);
    # check it where the assistant does not depend on the student (t = 1: r = p)
    return {"taid": dict(t_start=1.0, t_end=1.0)}.get(name, {})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", METHODS)
def test_gradcheck(name, reduction, backend):
    if name == "akl":
        pytest.skip("akl's head/tail weights depend on q but are detached by definition; its gradient "
                    "(w_head grad FKL + w_tail grad RKL with fixed weights) is compared in test_methods")
    s, t = ref.make_logits((2, 3, 6), "finite", seed=45, scale=1.0)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    params = _gradcheck_params(name)
    extra = {"student_generated": torch.tensor([False, False])} if name == "distillm2" else {}
    for T in (1.0, 0.7):
        fn = kdplug.get(name, backend=backend, temperature=T, reduction=reduction, **params)
        x = s.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: fn(a, t, mask=mask, **extra), (x,), eps=1e-6, atol=1e-6,
                                        rtol=1e-5)


def test_gradcheck_taid_interior_with_detached_assistant():
    """TAID at 0 < t < 1: the gradient is d/ds of -sum r log q with r held fixed."""
    s, t = ref.make_logits((2, 5), "finite", seed=46, scale=1.0)
    fn = kdplug.get("taid", t_start=0.3, t_end=0.3, reduction="none")
    r = torch.softmax(0.7 * s + 0.3 * t, -1)
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, t).sum(), x)
    x2 = s.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((-(r * torch.log_softmax(x2, -1)).sum(-1)).sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Reductions, num_items, t2_scale
# --------------------------------------------------------------------------------------------
RED_METHODS = ["fkl", "amid", "distillm2", "akl"]


RED_CASES = [(r, n) for r in ("mean", "sum", "none", "batchmean", "sequence") for n in (None, 7, "tensor")
             if n is None or r not in ("sum", "none")]  # num_items applies to mean, batchmean, sequence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t2", [False, True])
@pytest.mark.parametrize("reduction,num_items", RED_CASES)
@pytest.mark.parametrize("name", RED_METHODS)
def test_reductions(name, reduction, num_items, t2, backend):
    s, t = ref.make_logits((4, 5, 9), "shared_inf", seed=47)
    mask = ref.random_mask((4, 5), 47)
    mask[2] = False  # an empty sequence
    T = 1.5
    flags = torch.tensor([True, False, False, True])
    extra = {"student_generated": flags} if name == "distillm2" else {}
    n_items = torch.tensor(7) if num_items == "tensor" else num_items
    fn = kdplug.get(name, backend=backend, temperature=T, reduction=reduction, t2_scale=t2)
    x = s.clone().requires_grad_(True)
    kw = {} if n_items is None else {"num_items": n_items}
    loss = fn(x, t, mask=mask, **kw, **extra)
    y = s.clone().requires_grad_(True)
    per = ref.per_token(name, y, t, temperature=T, mask=mask, student_generated=flags if extra else None)
    expect = ref.reduce(per, mask, reduction, None if n_items is None else int(n_items))
    if t2:
        expect = expect * T ** 2
    assert loss.shape == expect.shape
    torch.testing.assert_close(loss, expect, rtol=1e-10, atol=1e-12)
    w = ref.random_weights(loss.shape, 3) if loss.dim() else torch.tensor(1.7, dtype=torch.float64)
    (g,) = torch.autograd.grad((loss * w).sum(), x)
    (ge,) = torch.autograd.grad((expect * w).sum(), y)
    torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-12)


def test_default_reductions():
    assert kdplug.get("fkl").reduction == "mean"
    assert kdplug.get("distillm2").reduction == "sequence"
    s, t = ref.make_logits((3, 4, 6), "finite", seed=48)
    flags = torch.tensor([True, False, True])
    a = kdplug.get("distillm2")(s, t, student_generated=flags)
    b = kdplug.get("distillm2", reduction="sequence")(s, t, student_generated=flags)
    assert torch.equal(a, b)


def test_num_items_gives_the_big_batch_gradient():
    """Two micro-batches with num_items = the global token count sum to the big batch's loss."""
    s, t = ref.make_logits((4, 5, 9), "finite", seed=49)
    mask = ref.random_mask((4, 5), 49)
    fn = kdplug.get("amid")
    total = int(mask.sum())
    x = s.clone().requires_grad_(True)
    big = fn(x, t, mask=mask)
    (gb,) = torch.autograd.grad(big, x)
    y = s.clone().requires_grad_(True)
    acc = fn(y[:2], t[:2], mask=mask[:2], num_items=total) + fn(y[2:], t[2:], mask=mask[2:], num_items=total)
    (ga,) = torch.autograd.grad(acc, y)
    torch.testing.assert_close(acc, big, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)



def test_num_items_must_be_a_count():
    s, t = ref.make_logits((3, 5, 9), "finite", seed=50)
    fn = kdplug.get("fkl")
    for bad in (-3, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="num_items must be a finite count >= 0"):
            fn(s, t, num_items=bad)
    with pytest.raises(ValueError, match="num_items must be a single count"):
        fn(s, t, num_items=torch.tensor([3, 4]))
    # 0 (no token in the whole batch) divides by 1: a fully masked batch's 0, never 0 / 0
    empty = torch.zeros(3, 5, dtype=torch.bool)
    assert fn(s, t, mask=empty, num_items=0) == 0
    assert torch.equal(fn(s, t, num_items=torch.tensor(7)), fn(s, t, num_items=7))

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_error_shape_mismatch():
    fn = kdplug.get("fkl")
    with pytest.raises(ValueError, match="student_logits|teacher_logits"):
        fn(_logits(2, 3, 5), _logits(2, 4, 5))
    with pytest.raises(ValueError, match="(?i)vocab|V="):
        fn(_logits(2, 3, 5), _logits(2, 3, 6))


@pytest.mark.parametrize("bad", ["student", "teacher"])
def test_error_non_float_logits(bad):
    fn = kdplug.get("rkl")
    s, t = _logits(2, 5), _logits(2, 5)
    if bad == "student":
        s = torch.randint(0, 5, (2, 5))
    else:
        t = torch.randint(0, 5, (2, 5))
    with pytest.raises((TypeError, ValueError), match=f"{bad}_logits"):
        fn(s, t)


def test_error_mask_and_labels():
    fn = kdplug.get("fkl")
    with pytest.raises(ValueError, match="mask.*labels|labels.*mask"):
        fn(_logits(2, 5), _logits(2, 5), mask=torch.ones(2, dtype=torch.bool), labels=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name", METHODS)
def test_error_unmasked_all_neginf_row(name, side):
    s, t = _logits(2, 3, 5), _logits(2, 3, 5)
    (s if side == "student" else t)[1, 2] = NINF
    fn = kdplug.get(name)
    with pytest.raises(RuntimeError, match=f"{side}_logits"):
        fn(s, t, **_flags(name, (2, 3)))
    # the same row masked is fine
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(fn(s, t, mask=mask, **_flags(name, (2, 3))))


OUT_OF_RANGE = [
    ("symmetric_kl", "lam", -0.1), ("symmetric_kl", "lam", 1.1), ("symmetric_kl", "form", "kld"),
    ("fkl", "form", "xx"), ("gjsd", "beta", -0.1), ("gjsd", "beta", 1.5),
    ("skl", "alpha", -0.1), ("skl", "alpha", 1.1), ("skl", "form", "x"), ("srkl", "alpha", 1.1), ("srkl", "alpha", -1.0),
    ("abkd", "alpha", -0.1), ("abkd", "beta", -0.5), ("abkd", "limit_scale", "other"),
    ("akl", "mu", -0.1), ("akl", "mu", 1.5), ("akl", "variant", "x"),
    ("taid", "t_start", -0.1), ("taid", "t_start", 1.5), ("taid", "t_end", 1.5), ("taid", "momentum", 1.5),
    ("taid", "step_size", -1.0), ("taid", "value", "x"), ("taid", "update_every", "x"), ("taid", "total_steps", 0),
    ("amid", "lam", 1.5), ("amid", "lam", -0.5), ("amid", "ab_alpha", -0.1), ("amid", "ab_beta", -1.0),
    ("amid", "divergence", "x"), ("amid", "order", "pq"), ("amid", "alpha_ge_1", "x"),
    ("amid", "alpha", float("nan")),
    ("distillm2", "alpha_1", 1.5), ("distillm2", "alpha_2", -0.1), ("distillm2", "beta", 2.5),
    ("distillm2", "beta", -0.5),
]


@pytest.mark.parametrize("name,param,value", OUT_OF_RANGE, ids=[f"{n}-{p}={v}" for n, p, v in OUT_OF_RANGE])
def test_error_out_of_range_param(name, param, value):
    with pytest.raises(ValueError, match=param):
        kdplug.get(name, **{param: value})


@pytest.mark.parametrize("name", METHODS)
def test_error_unknown_param(name):
    with pytest.raises(TypeError, match="bogus_param"):
        kdplug.get(name, bogus_param=1.0)


@pytest.mark.parametrize("kw,word", [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
                                     (dict(reduction="avg"), "reduction"), (dict(inf_policy="drop"), "inf_policy")])
def test_error_common_options(kw, word):
    with pytest.raises(ValueError, match=word):
        kdplug.get("fkl", **kw)


def test_error_taid_linear_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        kdplug.get("taid", adaptive=False)


def test_error_taid_t_end_below_t_start():
    with pytest.raises(ValueError, match="t_end"):
        kdplug.get("taid", t_start=0.8, t_end=0.5)


def test_error_distillm2_needs_flags():
    fn = kdplug.get("distillm2")
    with pytest.raises(TypeError, match="student_generated"):
        fn(_logits(2, 3, 5), _logits(2, 3, 5))
    with pytest.raises(ValueError, match="student_generated"):
        fn(_logits(2, 3, 5), _logits(2, 3, 5), student_generated=torch.tensor([True, False, True]))


def test_precision_of_computation():
    """bf16/fp16 inputs are computed in fp32 (the loss is fp32), float64 in float64."""
    s, t = ref.make_logits((3, 11), "finite", seed=50)
    fn = kdplug.get("amid", reduction="none")
    for dtype, expect in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                          (torch.float32, torch.float32), (torch.float64, torch.float64)):
        out = fn(s.to(dtype), t.to(dtype))
        assert out.dtype == expect
    out64 = fn(s, t)
    r = ref.per_token("amid", s, t)
    torch.testing.assert_close(out64, r, rtol=1e-12, atol=1e-14)
