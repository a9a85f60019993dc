"""The compiled core (torch.ops.kdplug.*) against the PyTorch path, its executable specification.

Every built-in method (and a few settings of each) runs through both backends on the same inputs;
per-token losses and gradients must agree: fp64 to ~1e-10, fp32 to fp32 rounding, bf16 / fp16
(fp32 math on both paths) to one rounding of the gradient's dtype. Plus: odd shapes, strided rows,
-inf patterns under both inf policies, masked rows holding NaN, seeded random configurations that
draw all of those at once, opcheck, gradcheck, fallbacks, a third-party recipe, and torch.compile of
a training step.
"""
from __future__ import annotations

import importlib.metadata
import types
import warnings

import pytest
import torch

import kdplug
from _common import (CASE_IDS, CASES, FWD_GRAD_TOL, TOL, VARIANTS, kept_exps, make_logits,  # noqa: F401
                     random_case, strided_rows)
METHODS = sorted(m.name for m in kdplug.list_methods())
from kdplug import Assistant, Method, Recipe, Term, _extension, _ops, _torch_impl
from kdplug._pack import params_tensor, structure_and_consts

pytestmark = pytest.mark.skipif(not _ops.HAS_OPS, reason=f"compiled core not built: {_extension.why_not()}")

NINF = float("-inf")

# A few settings per method: limits, alternative forms, each mixture kind. A built-in method
# missing here is still tested with its defaults.

def evaluate(name, params, s, t, backend, *, mask=None, inf_policy="exact", temperature=1.7, grad_out=None):
    """Per-token loss (reduction "none") and the gradient of sum(grad_out * loss) w.r.t. s. name: a
    registered method's name, or an unregistered kdplug.Method."""
    make = kdplug.KDLoss if isinstance(name, Method) else kdplug.get
    loss_fn = make(name, backend=backend, temperature=temperature, inf_policy=inf_policy, reduction="none", **params)
    s = s.detach().clone().requires_grad_()
    extra = {}
    if name == "distillm2":
        extra["student_generated"] = torch.arange(s.shape[0]) % 2 == 0
    out = loss_fn(s, t, mask=mask, **extra)
    if grad_out is None:
        grad_out = torch.linspace(-1.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * grad_out).sum().backward()
    return out.detach(), s.grad


def assert_match(name, params, s, t, *, grad_floor=0.0, **kw):
    """grad_floor: the least gradient scale the absolute tolerance is taken against (where the true
    gradient is 0, e.g. student = teacher, both paths return rounding noise of the terms' size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback on the compiled side
        out_c, grad_c = evaluate(name, params, s, t, "compiled", **kw)
    out_t, grad_t = evaluate(name, params, s, t, "torch", **kw)
    lr, la, gr, ga = TOL[s.dtype]
    assert out_c.dtype == out_t.dtype and grad_c.dtype == grad_t.dtype == s.dtype
    assert not torch.isnan(out_c).any() and torch.isfinite(grad_c.double()).all()
    torch.testing.assert_close(out_c, out_t, rtol=lr, atol=la, msg=lambda m: f"{name}({params}) loss: {m}")
    scale = max(grad_t.double().abs().max().item(), grad_floor) or 1.0
    torch.testing.assert_close(grad_c.double(), grad_t.double(), rtol=gr, atol=ga * scale,
                               msg=lambda m: f"{name}({params}) gradient: {m}")
    return out_c, grad_c


# ---- the sweep -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_torch_path(name, params, dtype):
    s, t = make_logits((4, 3, 37), dtype)
    assert_match(name, params, s, t)


@pytest.mark.parametrize("shape", [(2, 1), (3, 17), (2, 129), (1, 2, 1000)], ids=str)
@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "skl", "abkd", "amid", "taid"])
def test_odd_shapes(name, shape):
    s, t = make_logits(shape, torch.float32, seed=1)
    assert_match(name, {}, s, t)


@pytest.mark.parametrize("name,params", [("fkl", {}), ("symmetric_kl", {}), ("amid", {"alpha": 0.5}),
                                         ("skl", {}), ("taid", {})])
def test_strided_rows(name, params):
    """Rows of a wider tensor (row stride > V) and a student whose rows are not evenly spaced."""
    wide_s, wide_t = make_logits((6, 70), torch.float32, seed=2)
    s, t = wide_s[:, 5:56], wide_t[:, 3:54]
    assert s.stride(0) == 70 and not s.is_contiguous()
    out_c, grad_c = assert_match(name, params, s, t)
    out_d, grad_d = evaluate(name, params, s.contiguous(), t.contiguous(), "compiled")
    torch.testing.assert_close(out_c, out_d, rtol=0, atol=0)  # same math whatever the strides
    torch.testing.assert_close(grad_c, grad_d, rtol=0, atol=0)


def inf_patterns(dtype):
    """Rows with shared (padded-vocabulary) -inf, teacher-only and student-only -inf entries."""
    s, t = make_logits((5, 23), dtype, seed=3)
    s[:, -3:] = NINF
    t[:, -3:] = NINF  # shared
    t[1, 4] = NINF   # teacher-only: reverse KL's support mismatch
    s[2, 5] = NINF   # student-only: forward KL's support mismatch
    t[3, 6] = NINF
    s[3, 7] = NINF   # both kinds in one row
    s[4, :10] = NINF
    t[4, :10] = NINF  # a row that is mostly padding
    return s, t


@pytest.mark.parametrize("inf_policy", ["exact", "exclude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_inf_patterns(name, params, dtype, inf_policy):
    s, t = inf_patterns(dtype)
    out, grad = assert_match(name, params, s, t, inf_policy=inf_policy)
    assert (grad[s == NINF] == 0).all(), "gradient at a -inf student logit"


@pytest.mark.parametrize("name,params", [("skl", {}), ("srkl", {}), ("gjsd", {}), ("distillm2", {}), ("amid", {}),
                                         ("amid", {"alpha": -1.0, "divergence": "kl"}), ("tvd", {}),
                                         ("abkd", {}), ("fkl", {}), ("rkl", {}), ("taid", {})])
def test_extreme_logit_gaps(name, params):
    """Log-probabilities far below -85 (p or q subnormal or 0 in fp32) in some SIMD packs only:
    those packs take the general formulas, the others the fast ones."""
    s, t = make_logits((3, 100), torch.float32, seed=8)
    s[0, 40:50] -= 150
    t[1, 60:70] -= 120
    s[2, :16] -= 95
    t[2, :16] -= 95
    assert_match(name, params, s, t, temperature=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", [("tvd", {}), ("gjsd", {}), ("skl", {}), ("srkl", {}),
                                         ("gjsd", {"beta": 0.1, "normalized": True}), ("fkl", {}),
                                         ("rkl", {}), ("symmetric_kl", {}), ("taid", {}), ("amid", {}),
                                         ("amid", {"divergence": "kl", "order": "qr"}),
                                         ("amid", {"alpha": 1.5, "alpha_ge_1": "power_mean"})])
def test_kept_exps_with_moving_maxima(name, params, dtype):
    """The rows that keep their exps take them in the pass that reads the logits, relative to the
    running maximum, with a new segment of scales each time it grows (and the gradient pass visits
    the segments from the last to the first; AMiD: the exps of its mixture's normalizer, in the
    mixture's pass, which pass 3 reads in increasing order): a row whose maximum grows at every pack, one whose
    maximum is in its first pack, a first pack of -inf, the maximum in the last (partial) pack, and
    a row whose teacher maximum grows while the student's does not."""
    V = 16 * 9 + 5  # nine whole packs of 16 floats (18 of 8) and a partial one
    g = torch.Generator().manual_seed(21)
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    s = 0.7 * t + torch.randn(5, V, generator=g, dtype=torch.float64) * 1.5
    ramp = torch.linspace(0, 30, V, dtype=torch.float64)
    t[0] += ramp
    s[0] += ramp
    t[1] -= ramp
    s[1] -= ramp
    t[2, :20] = NINF
    s[2, :20] = NINF
    t[3, -2] += 40
    s[3, -1] += 40
    t[4] += ramp
    s[4] -= ramp
    assert_match(name, params, s.to(dtype), t.to(dtype), temperature=1.0)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_masked_rows_are_never_read(name, params):
    s, t = make_logits((3, 4, 29), torch.float32, seed=4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = False
    s[0, 1] = float("nan")
    t[2, 3] = float("nan")
    s[2, 3] = NINF
    out, grad = assert_match(name, params, s, t, mask=mask)
    assert (out[~mask] == 0).all() and (grad[~mask] == 0).all()


# Random configurations (_common.random_case): every axis of the sweeps above drawn at once.
@pytest.mark.parametrize("seed", range(160))
def test_random_configurations(seed):
    c = random_case(seed)
    s, t = c["s"].to(c["dtype"]), c["t"].to(c["dtype"])
    if c["strided"]:
        s, t = strided_rows(s, t)
    kw = {"temperature": c["temperature"], "inf_policy": c["inf_policy"], "mask": c["mask"]}
    if c["grad_out"] is not None:
        kw["grad_out"] = c["grad_out"].to(torch.float64 if c["dtype"] == torch.float64 else torch.float32)
    # the gradient's natural size: |incoming gradient| / T (each entry's dloss/ds is O(1) / T)
    grad_out_max = 2.0 if c["grad_out"] is None else c["grad_out"].abs().max().item()
    out, grad = assert_match(c["name"], c["params"], s, t, grad_floor=grad_out_max / c["temperature"], **kw)
    assert (grad[s == NINF] == 0).all(), "gradient at a -inf student logit"
    if c["mask"] is not None:
        assert (out[~c["mask"]] == 0).all() and (grad[~c["mask"]] == 0).all()



def random_recipe(seed, tvd=True):
    """A third party's recipe drawn at random: 1-4 terms of any divergence between any two operands
    (weights and AB parameters at their endpoints too), with or without an assistant of any alpha,
    lam and detach."""
    import random

    rng = random.Random(seed)
    assistant = None
    if rng.random() < 0.6:
        assistant = Assistant(lam=rng.choice([0.0, 1.0, 0.5, rng.random()]),
                              alpha=rng.choice([-1.0, 1.0, 0.5, 3.0, -3.0, rng.uniform(-2, 2)]), detach=rng.random() < 0.3)
    operands = ["teacher", "student"] + (["assistant"] if assistant else [])
    terms = []
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        lhs, rhs = rng.sample(operands, 2)
        # NB: TVD is not differentiable where its two sides are equal; the two paths reach such a tie
        # (an assistant with lam = 0 or 1 is one of the sides) with different rounding, and so with
        # different subgradients
        kinds = ["kl", "ce", "ab"] + (["tvd"] if tvd and not (assistant and assistant.lam in (0.0, 1.0)) else [])
        kind = rng.choice(kinds)
        if kind == "ce" and (lhs == "student" or (lhs == "assistant" and not assistant.detach)):
            kind = "kl"  # (CE's left side must not depend on the student)
        ab = {"ab_alpha": rng.choice([0.0, 1.0, 0.3, 1.5 * rng.random()]),
              "ab_beta": rng.choice([0.0, 1.0, 0.6, 1.5 * rng.random()])} if kind == "ab" else {}
        terms.append(Term(lhs, rhs, kind, weight=rng.choice([1.0, 0.0, 2 * rng.random()]), **ab))
    if assistant and not any("assistant" in (t.lhs.value, t.rhs.value) for t in terms):
        terms.append(Term("teacher", "assistant"))
    return Recipe(tuple(terms), assistant=assistant)


@pytest.mark.parametrize("seed", range(120))
def test_random_recipes(seed):
    """Any recipe runs on the compiled core and meets the PyTorch path: random recipes on random
    inputs (_common.random_case)."""
    c = random_case(60000 + seed)
    s, t = c["s"].to(c["dtype"]), c["t"].to(c["dtype"])
    recipe = random_recipe(seed, tvd=c["pattern"] != "equal")  # (student = teacher: a TVD tie)
    method = Method("random_recipe", build=lambda: recipe)
    # the gradient's natural size: |incoming gradient| / T times the terms' total weight
    floor = 2.0 / c["temperature"] * max(1.0, sum(float(term.weight) for term in recipe.terms))
    assert_match(method, {}, s, t, grad_floor=floor, mask=c["mask"], temperature=c["temperature"],
                 inf_policy=c["inf_policy"])


def test_unmasked_dead_rows_raise():
    s, t = make_logits((3, 11), torch.float32)
    loss_fn = kdplug.get("fkl", backend="compiled")
    bad_s = s.clone()
    bad_s[1] = NINF
    with pytest.raises(RuntimeError, match="student_logits has a row that is not masked but is all -inf"):
        loss_fn(bad_s, t)
    bad_t = t.clone()
    bad_t[2, 3] = float("inf")
    with pytest.raises(RuntimeError, match="teacher_logits has a row"):
        loss_fn(s, bad_t)
    loss_fn(bad_s, t, mask=torch.tensor([True, False, True]))  # masked: fine


def test_zero_incoming_gradient_is_exactly_zero():
    """A token whose loss is +inf still gets an exactly-zero gradient when its weight is 0."""
    s, t = inf_patterns(torch.float32)
    grad_out = torch.ones(5)
    grad_out[2] = 0  # row 2 has forward KL = +inf
    for backend in ("compiled", "torch"):
        out, grad = evaluate("fkl", {}, s, t, backend, grad_out=grad_out)
        assert out[2] == float("inf")
        assert (grad[2] == 0).all() and torch.isfinite(grad).all()


def test_one_pass_forward_matches_two_pass(monkeypatch):
    """The one-pass forward of logit-space recipes (FKL, RKL, TAID, ...) against the generic one."""
    s, t = inf_patterns(torch.float32)
    cases = [("fkl", {}), ("fkl", {"form": "ce"}), ("rkl", {}), ("symmetric_kl", {}), ("akl", {}),
             ("taid", {}), ("taid", {"t_start": 1.0, "value": "kl"})]
    for inf_policy in ("exact", "exclude"):
        for name, params in cases:
            fused = evaluate(name, params, s, t, "compiled", inf_policy=inf_policy)
            monkeypatch.setenv("KDPLUG_NO_FUSED", "1")
            generic = evaluate(name, params, s, t, "compiled", inf_policy=inf_policy)
            monkeypatch.delenv("KDPLUG_NO_FUSED")
            torch.testing.assert_close(fused[0], generic[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused[1], generic[1], rtol=1e-4, atol=1e-7)


def test_deterministic_across_thread_counts():
    s, t = make_logits((64, 300), torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(evaluate("amid", {}, s, t, "compiled"))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


# ---- the ops themselves ----------------------------------------------------------------------------
def packed(name, **params):
    loss_fn = kdplug.get(name, **params)
    recipe = loss_fn.recipe if not hasattr(loss_fn.recipe, "if_true") else loss_fn.recipe.if_false
    structure, consts = structure_and_consts(recipe, "exact")
    values = loss_fn.schedule.value() if loss_fn.schedule is not None else {}
    return recipe, list(structure), list(consts), params_tensor(recipe, 1.3, values, torch.device("cpu"))


@pytest.mark.parametrize("name,params", [("fkl", {}), ("amid", {"alpha": 0.5}), ("akl", {}), ("taid", {}),
                                         ("abkd", {"alpha": 0.0, "beta": 0.5})])
def test_opcheck(name, params):
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((5, 19), torch.float64, seed=6)
    mask = torch.tensor([True, True, False, True, True])
    tw = torch.rand(5, structure[3], dtype=torch.float64) if name == "akl" else None
    s.requires_grad_()
    torch.library.opcheck(torch.ops.kdplug.divergence_fwd.default, (s, t, p, tw, mask, structure, consts))
    _, stats = torch.ops.kdplug.divergence_fwd(s.detach(), t, p, tw, mask, structure, consts)
    g = torch.randn(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kdplug.divergence_bwd.default,
                          (g, s.detach(), t, p, tw, mask, stats, structure, consts))


@pytest.mark.parametrize("name,params", [("fkl", {}), ("amid", {"alpha": 0.5}), ("akl", {}), ("taid", {}),
                                         ("gjsd", {})])
def test_opcheck_inplace_and_partials(name, params):
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((5, 19), torch.float64, seed=6)
    mask = torch.tensor([True, True, False, True, True])
    tw = torch.rand(5, structure[3], dtype=torch.float64) if name == "akl" else None
    _, stats = torch.ops.kdplug.divergence_fwd(s, t, p, tw, mask, structure, consts)
    g = torch.randn(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kdplug.divergence_bwd_inplace.default,
                          (g, s.clone(), t, p, tw, mask, stats, structure, consts))
    # into: the unmasked rows written, the masked row left as it was
    into = torch.full_like(s, 5.0)
    torch.library.opcheck(torch.ops.kdplug.divergence_bwd_into.default,
                          (g, s, t, p, tw, mask, stats, structure, consts, into.clone()))
    torch.ops.kdplug.divergence_bwd_into(g, s, t, p, tw, mask, stats, structure, consts, into)
    full = torch.ops.kdplug.divergence_bwd(g, s, t, p, tw, mask, stats, structure, consts)
    torch.testing.assert_close(into[mask], full[mask], rtol=0, atol=0)
    assert bool((into[~mask] == 5.0).all())
    lse = torch.ops.kdplug.divergence_partials(s, t, p, tw, mask, None, 0, structure, consts)
    torch.library.opcheck(torch.ops.kdplug.divergence_partials.default, (s, t, p, tw, mask, None, 0, structure, consts))
    given = torch.stack([lse[:, 0], lse[:, 1], stats[:, 2]], 1).contiguous()
    torch.library.opcheck(torch.ops.kdplug.divergence_partials.default,
                          (s, t, p, tw, mask, given, 2, structure, consts))
    # one shard = the whole row: stage 2's sums are the forward's loss, H^r and U
    sums = torch.ops.kdplug.divergence_partials(s, t, p, tw, mask, given, 2, structure, consts)
    loss, _ = torch.ops.kdplug.divergence_fwd(s, t, p, tw, mask, structure, consts)
    torch.testing.assert_close(sums[:, 0], loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums[:, 2], stats[:, 3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums[:, 1] + sums[:, 3] - sums[:, 2] * sums[:, 4], stats[:, 4], rtol=1e-9, atol=1e-12)


# ---- in-place backward ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_inplace_backward(name, params, backend):
    """The gradient written over the student logits equals the out-of-place one, which eager
    training computes in the forward (strided rows, a masked row, bf16 too)."""
    if name == "distillm2":
        with pytest.raises(ValueError, match="inplace_backward"):
            kdplug.get(name, inplace_backward=True, **params)
        return
    for dtype in (torch.float32, torch.bfloat16):
        s, t = make_logits((6, 41), dtype, seed=11)
        mask = torch.tensor([True, True, False, True, True, True])
        leaf = s.detach().clone().requires_grad_()
        kdplug.get(name, backend=backend, **params)(leaf, t, mask=mask).backward()
        base = torch.full((6, 50), 7.0, dtype=dtype)
        base[:, :41] = s
        x = base.clone().requires_grad_()
        logits = x * 1  # a non-leaf whose storage the backward overwrites
        rows = logits[:, :41]  # strided rows (stride 50)
        kdplug.get(name, backend=backend, inplace_backward=True, **params)(rows, t, mask=mask).backward()
        # (bit for bit but where the forward keeps its exps: see _common.kept_exps)
        tol = FWD_GRAD_TOL[dtype] if backend == "compiled" and kept_exps(name, params) else 0
        torch.testing.assert_close(x.grad[:, :41], leaf.grad, rtol=tol, atol=tol * leaf.grad.abs().max().item())
        torch.testing.assert_close(rows.detach(), x.grad[:, :41], rtol=0, atol=0)  # the logits are now the gradient
        assert bool((logits.detach()[:, 41:] == 7).all())  # columns outside the rows untouched


def test_inplace_backward_never_feeds_a_gradient_as_logits():
    """Another node that saved the logits sees autograd's version error instead of the gradient."""
    s, t = make_logits((4, 23), torch.float32)
    ref = s.clone().requires_grad_()
    (kdplug.get("fkl")(ref, t) + (ref * ref).sum()).backward()
    # the square's node was made first, so it runs after the loss's: it must not read a gradient
    x = s.clone().requires_grad_()
    logits = x * 1
    square = (logits * logits).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (square + kdplug.get("fkl", inplace_backward=True)(logits, t)).backward()
    # made the other way round, the square's backward reads the logits first: a correct gradient
    x = s.clone().requires_grad_()
    logits = x * 1
    loss = kdplug.get("fkl", inplace_backward=True)(logits, t)
    (loss + (logits * logits).sum()).backward()
    torch.testing.assert_close(x.grad, ref.grad)


# ---- the per-token log-ratio at sampled ids -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("name", ["fkl", "taid", "amid", "akl", "distillm2", "gjsd"])
def test_log_ratio_at_sampled_ids(name, backend):
    s, t = make_logits((2, 5, 31), torch.float32, seed=4)
    s[0, 1, 3] = t[0, 1, 3] = NINF   # both 0: the ratio is 0
    t[0, 2, 4] = NINF                # teacher 0: -inf
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(1))
    ids[0, 1], ids[0, 2] = 3, 4
    extra = {"student_generated": torch.tensor([True, False])} if name == "distillm2" else {}
    loss_fn = kdplug.get(name, backend=backend, temperature=1.5)
    loss, ratio = loss_fn(s, t, mask=mask, log_ratio_at=ids, **extra)
    torch.testing.assert_close(loss, loss_fn(s, t, mask=mask, **extra))
    lp = torch.log_softmax(t.double() / 1.5, -1).gather(-1, ids[..., None])[..., 0]
    lq = torch.log_softmax(s.double() / 1.5, -1).gather(-1, ids[..., None])[..., 0]
    want = torch.where(mask, lp - lq, torch.zeros(()))
    want[0, 1] = 0.0
    assert ratio.dtype == torch.float64 and ratio[0, 2] == NINF
    torch.testing.assert_close(ratio, want, rtol=1e-5, atol=1e-5)


def test_log_ratio_at_bad_ids():
    s, t = make_logits((3, 7), torch.float32)
    with pytest.raises(ValueError, match="outside"):
        kdplug.get("fkl")(s, t, log_ratio_at=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="leading shape"):
        kdplug.get("fkl")(s, t, log_ratio_at=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        kdplug.get("fkl")(s, t, log_ratio_at=torch.zeros(3))


@pytest.mark.parametrize("name,params", [("fkl", {}), ("rkl", {}), ("symmetric_kl", {}), ("tvd", {}),
                                         ("skl", {}), ("gjsd", {}), ("abkd", {}), ("amid", {"alpha": 0.5}),
                                         ("amid", {"alpha": 1.0, "order": "qr"})])
def test_gradcheck(name, params):
    """float64 through the op, for recipes whose assistant is not detached (a detached assistant is
    by design not the derivative)."""
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((3, 9), torch.float64, seed=7)
    s[0, 2] = t[0, 2] = NINF
    mask = torch.tensor([True, True, False])
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _ops.recipe_loss(x, t, p, None, mask, structure, consts)[0], (s,))


def test_output_dtypes_and_row_stats():
    _, structure, consts, p = packed("skl")
    for dtype, compute in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                           (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        s, t = make_logits((4, 33), dtype)
        loss, stats = torch.ops.kdplug.divergence_fwd(s, t, p, None, torch.ones(4, dtype=torch.bool), structure,
                                                      consts)
        assert loss.dtype == stats.dtype == compute and stats.shape == (4, _ops.N_STATS)
        lse_s = torch.logsumexp(s.double() / 1.3, -1)
        torch.testing.assert_close(stats[:, 0].double(), lse_s, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    _, structure, consts, p = packed("fkl")
    s, t = make_logits((2, 5), torch.float32)
    m = torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.kdplug.divergence_fwd(s, t.double(), p, None, m, structure, consts)
    with pytest.raises(RuntimeError, match="invalid packed recipe"):
        torch.ops.kdplug.divergence_fwd(s, t, p, None, m, structure[:4], consts)
    with pytest.raises(RuntimeError, match="params must be"):
        torch.ops.kdplug.divergence_fwd(s, t, p.float(), None, m, structure, consts)


def test_build_info():
    info = _extension.build_info()
    for key in ("backends", "simd", "cuda_archs", "compiler", "torch_built_against", "threads"):
        assert key in info, key
    assert "cpu" in info["backends"] and isinstance(info["simd"], str)
    assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]


# ---- fallbacks -------------------------------------------------------------------------------------
@pytest.fixture
def no_extension(monkeypatch):
    reason = "the compiled extension kdplug._C could not be loaded (test)"
    monkeypatch.setattr(_ops, "HAS_OPS", False)
    monkeypatch.setattr(_extension, "has_ops", lambda: False)
    monkeypatch.setattr(_extension, "why_not", lambda: reason)
    _extension.warn_fallback.cache_clear()
    yield reason
    _extension.warn_fallback.cache_clear()


def test_auto_falls_back_with_one_warning(no_extension):
    s, t = make_logits((2, 3, 11))
    loss_fn = kdplug.get("skl")
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        a = loss_fn(s, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = loss_fn(s, t)  # once per reason
    torch.testing.assert_close(a, kdplug.get("skl", backend="torch")(s, t))
    assert torch.equal(a, b)


def test_compiled_raises_without_extension(no_extension):
    with pytest.raises(RuntimeError, match="could not be loaded"):
        kdplug.get("fkl", backend="compiled")


@pytest.mark.parametrize("what", ["teacher_grad", "dtypes", "stride"])
def test_fallback_reasons(what):
    _extension.warn_fallback.cache_clear()
    s, t = make_logits((3, 13))
    if what == "teacher_grad":
        t = t.clone().requires_grad_()
        match = "teacher_logits requires grad"
    elif what == "dtypes":
        t = t.double()
        match = "different dtypes"
    else:
        s, t = s.t().contiguous().t(), t.t().contiguous().t()
        match = "not contiguous"
    with pytest.raises(RuntimeError, match=match):
        kdplug.get("fkl", backend="compiled")(s, t)
    with pytest.warns(RuntimeWarning, match=match):
        out = kdplug.get("fkl")(s, t)
    torch.testing.assert_close(out, kdplug.get("fkl", backend="torch")(s, t))
    if what == "teacher_grad":  # the PyTorch path differentiates w.r.t. the teacher
        out.backward()
        assert t.grad is not None and torch.isfinite(t.grad).all()
    _extension.warn_fallback.cache_clear()


# ---- a third-party recipe on the compiled path -----------------------------------------------------
def jeffreys(w: float = 0.5) -> Recipe:
    """w KL(p||q) + (1 - w) KL(q||p)."""
    return Recipe((Term("teacher", "student", weight=w), Term("student", "teacher", weight=1.0 - w)))


def blend(w: float = 0.5) -> Recipe:
    """Three terms of three kinds: exercises the generic (two-pass) forward."""
    return Recipe((Term("teacher", "student", weight=w), Term("teacher", "student", "tvd", weight=0.2),
                   Term("student", "teacher", "ab", weight=0.3, ab_alpha=0.5, ab_beta=0.5)))


def tvd_mix(w: float = 0.5) -> Recipe:
    """TVD with KL and CE terms, no mixture: divergence_fwd_grad's kept-exps path for any terms."""
    return Recipe((Term("teacher", "student", "tvd", weight=w), Term("student", "teacher", weight=0.3),
                   Term("teacher", "student", "ce", weight=0.2)))


class _Dist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class _EntryPoint:
    group = "kdplug"

    def __init__(self, name, module):
        self.name, self.value, self._module = name, module.__name__, module
        self.dist = _Dist("kdplug-test-thirdparty", "1.0")

    def load(self):
        return self._module


@pytest.fixture
def third_party(monkeypatch, fresh_registry):
    module = types.ModuleType("kdplug_test_thirdparty")

    @kdplug.hookimpl
    def register_methods(register):
        register(Method("jeffreys_test", build=jeffreys, summary="Jeffreys divergence"))
        register(Method("blend_test", build=blend))
        register(Method("tvd_mix_test", build=tvd_mix))

    module.register_methods = register_methods
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "kdplug":
            found.append(_EntryPoint("thirdparty_test", module))
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return fresh_registry


def test_third_party_recipe_runs_compiled(third_party):
    s, t = inf_patterns(torch.float32)
    t[1, 4] = 0.0  # keep reverse KL finite
    out, grad = assert_match("jeffreys_test", {"w": 0.3}, s, t)
    fkl, _ = evaluate("fkl", {}, s, t, "torch")
    rkl, _ = evaluate("rkl", {}, s, t, "torch")
    finite = torch.isfinite(fkl) & torch.isfinite(rkl)
    torch.testing.assert_close(out[finite], (0.3 * fkl + 0.7 * rkl)[finite], rtol=1e-5, atol=1e-6)
    assert_match("blend_test", {"w": 0.4}, *make_logits((3, 41), torch.float32))
    assert_match("blend_test", {}, s, t, inf_policy="exclude")
    for inf_policy in ("exact", "exclude"):
        assert_match("tvd_mix_test", {"w": 0.6}, s, t, inf_policy=inf_policy)
    assert_match("tvd_mix_test", {}, *make_logits((3, 41), torch.bfloat16))
    with torch.no_grad():  # evaluation only: divergence_fwd's own passes
        for inf_policy in ("exact", "exclude"):
            got, want = (kdplug.get("tvd_mix_test", backend=b, inf_policy=inf_policy, reduction="none")(s, t)
                         for b in ("compiled", "torch"))
            torch.testing.assert_close(got, want, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])


# ---- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_torch_compile_training_step(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 48)
    x = torch.randn(2, 5, 16)
    teacher = torch.randn(2, 5, 48) * 2
    labels = torch.randint(0, 48, (2, 5))
    labels[0, 0] = -100
    loss_fn = kdplug.get(name, backend="compiled", temperature=1.5)
    extra = {"student_generated": torch.tensor([True, False])} if name == "distillm2" else {}

    def step(x, teacher, labels):
        return loss_fn(head(x), teacher, labels=labels, **extra)

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        head.zero_grad()
        loss = fn(x, teacher, labels)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    for compiled, eager in zip(results[0], results[1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)


# ---- the gradient computed in the forward (eager CPU training) -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] != "distillm2"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "distillm2"])
def test_fwd_grad_op_is_fwd_then_bwd(name, params, dtype):
    """divergence_fwd_grad = divergence_fwd + divergence_bwd(grad_loss=grad_scale) (-inf patterns
    and a masked row included): bit for bit for the recipes whose forward keeps u's parts; to a
    few ulp where the gradient comes from the forward's own exps (P = w / Z instead of
    exp(x - lse): see _common.kept_exps)."""
    _, structure, consts, p = packed(name, **params)
    s, t = inf_patterns(dtype)
    mask = torch.tensor([True, True, False, True, True])
    tw = torch.rand(5, structure[3], dtype=torch.float64) if name == "akl" else None
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.25], dtype=cdt)
    loss, stats, grad = torch.ops.kdplug.divergence_fwd_grad(s, t, p, tw, mask, scale, structure, consts)
    loss_ref, stats_ref = torch.ops.kdplug.divergence_fwd(s, t, p, tw, mask, structure, consts)
    grad_ref = torch.ops.kdplug.divergence_bwd(scale, s, t, p, tw, mask, stats_ref, structure, consts)
    if kept_exps(name, params):
        tol = FWD_GRAD_TOL[dtype]
        finite = torch.isfinite(loss_ref)
        assert torch.equal(finite, torch.isfinite(loss)) and torch.equal(loss[~finite], loss_ref[~finite])
        torch.testing.assert_close(loss[finite], loss_ref[finite], rtol=tol, atol=tol)
        torch.testing.assert_close(stats, stats_ref, rtol=tol, atol=tol)
        if forward_keeps_exps(name, params, dtype):  # the forward alone runs the same passes
            assert torch.equal(loss, loss_ref) and torch.equal(stats, stats_ref)
        # an entry is u - q U, u holding - H^r w r (w r <= q for these recipes): where |U| and
        # |H^r| are large the two round apart by tol relative to those terms, not to the result
        # (gjsd(beta=0.1, normalized=True): terms ~20x its largest gradient entry)
        q = torch.softmax(s.double() / p[0].item(), -1)
        terms = (scale.double().abs() / p[0].item())[:, None] * q * (stats_ref[:, 3:5].double().abs().sum(1))[:, None]
        err = (grad.double() - grad_ref.double()).abs()
        assert (err <= tol * (grad_ref.double().abs().max() + terms)).all(), err.max()
    else:
        assert torch.equal(loss, loss_ref) and torch.equal(stats, stats_ref) and torch.equal(grad, grad_ref)
    assert (grad[s == NINF] == 0).all() and (grad[~mask] == 0).all() and (grad[3] == 0).all()  # scale[3] = 0


def forward_keeps_exps(name, params, dtype) -> bool:
    """Whether divergence_fwd takes divergence_fwd_grad's first passes (each exp once, kept): TVD,
    the arithmetic mixture's KL terms in the dtypes with specialized instances, and the general
    alpha-mixture."""
    recipe = kdplug.get(name, **params).recipe
    if recipe.assistant is None:
        return all(term.divergence.name == "TVD" for term in recipe.terms)
    if recipe.assistant.alpha not in (-1.0, 1.0):
        return True
    return recipe.assistant.alpha == -1.0 and dtype in (torch.float32, torch.bfloat16)


# the logit-space recipes (forward_grad_row_logit)
LOGIT_CASES = [c for c in CASES if c[0] in ("fkl", "rkl", "symmetric_kl", "akl", "taid")]


# V_PAST_L2: a row whose logits and kept exps outgrow any core's L2 (7 MB in float32, 4.8 MB in
# bfloat16): forward_grad_row_logit then keeps d = s - t for KL(q||p)'s log-ratio (RKL, symmetric
# KL, AKL) instead of reading the logits again, and prefetches no next row
V_PAST_L2 = 600011


@pytest.mark.parametrize("V", [37, 64, V_PAST_L2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", [c for c in LOGIT_CASES], ids=[CASE_IDS[CASES.index(c)] for c in LOGIT_CASES])
def test_fwd_grad_rows_without_ninf(name, params, dtype, V):
    """A row with no -inf entry takes divergence_fwd_grad's mask-free passes; the same row with a
    column appended that is -inf on both sides (which adds exactly 0 to every sum) takes the masked
    ones. Loss, statistics and gradient must agree bit for bit."""
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((4, V), dtype, seed=11)
    ninf_col = torch.full((4, 1), NINF, dtype=dtype)
    s2, t2 = torch.cat([s, ninf_col], 1), torch.cat([t, ninf_col], 1)
    mask = torch.tensor([True, False, True, True])
    cdt = torch.float32
    scale = torch.tensor([0.5, 1.0, -2.0, 1.0], dtype=cdt)
    tw = torch.rand(4, structure[3], dtype=torch.float64) if name == "akl" else None
    loss, stats, grad = torch.ops.kdplug.divergence_fwd_grad(s, t, p, tw, mask, scale, structure, consts)
    loss2, stats2, grad2 = torch.ops.kdplug.divergence_fwd_grad(s2, t2, p, tw, mask, scale, structure, consts)
    assert torch.isfinite(loss).all() and (loss[mask] != 0).all()
    assert torch.equal(loss, loss2) and torch.equal(stats, stats2)
    assert torch.equal(grad, grad2[:, :V]) and (grad2[:, V] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", [c for c in LOGIT_CASES], ids=[CASE_IDS[CASES.index(c)] for c in LOGIT_CASES])
def test_fwd_grad_rows_past_l2(name, params, dtype):
    """A training step on rows past L2 (V_PAST_L2; a clean row, one with columns that are -inf on
    both sides, a masked row, a clean last row): the compiled gradient computed in the forward
    against the PyTorch path's."""
    s, t = make_logits((4, V_PAST_L2), dtype, seed=5)
    s[1, ::97] = NINF
    t[1, ::97] = NINF
    mask = torch.tensor([True, True, False, True])

    def step(backend):
        x = s.clone().requires_grad_()
        loss = kdplug.get(name, backend=backend, temperature=1.7, **params)(x, t, mask=mask)
        loss.backward()
        return loss.detach(), x.grad

    (loss_c, grad_c), (loss_t, grad_t) = step("compiled"), step("torch")
    lr, la, gr, ga = TOL[dtype]
    torch.testing.assert_close(loss_c.double(), loss_t.double(), rtol=lr, atol=la)
    scale = grad_t.double().abs().max().item()
    torch.testing.assert_close(grad_c.double(), grad_t.double(), rtol=gr, atol=ga * scale)
    assert (grad_c[1, ::97] == 0).all() and (grad_c[2] == 0).all()


@pytest.mark.parametrize("name,params", [c for c in LOGIT_CASES], ids=[CASE_IDS[CASES.index(c)] for c in LOGIT_CASES])
def test_fwd_grad_rows_with_and_without_ninf_in_one_call(name, params):
    """Which masks a row's first pass takes is guessed from the thread's previous row (a row with a
    -inf entry after rows without is read again with the masks): the guess changes no bit. Each row
    of a batch that mixes both kinds matches the same row computed alone."""
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((8, 45), torch.float32, seed=12)
    for row in (2, 3, 6):
        s[row, 7 * row % 45] = NINF
        t[row, (7 * row + 3) % 45] = NINF
    mask = torch.ones(8, dtype=torch.bool)
    scale = torch.linspace(0.5, 2.0, 8)
    tw = torch.rand(8, structure[3], dtype=torch.float64) if name == "akl" else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the rows in order, one thread: clean, clean, -inf, -inf, clean, ...
        loss, stats, grad = torch.ops.kdplug.divergence_fwd_grad(s, t, p, tw, mask, scale, structure, consts)
        for row in range(8):
            one = torch.ops.kdplug.divergence_fwd_grad(s[row:row + 1], t[row:row + 1], p,
                                                       None if tw is None else tw[row:row + 1], mask[:1],
                                                       scale[row:row + 1], structure, consts)
            assert torch.equal(one[0][0], loss[row]) and torch.equal(one[1][0], stats[row])
            assert torch.equal(one[2][0], grad[row])
    finally:
        torch.set_num_threads(threads)


GRAD_CACHE_SCRIPT = """
import torch
from kdplug._pack import params_tensor, structure_and_consts
import kdplug
recipe = kdplug.get("fkl").recipe
structure, consts = (list(x) for x in structure_and_consts(recipe, "exact"))
p = params_tensor(recipe, 1.0, {}, torch.device("cpu"))
def fwd_grad(seed, n=64, v=32768):  # gradients of 8 MiB: the cache's size class
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)
    mask, scale = torch.ones(n, dtype=torch.bool), torch.ones(n)
    grad = torch.ops.kdplug.divergence_fwd_grad(s, t, p, None, mask, scale, structure, consts)[2]
    stats = torch.ops.kdplug.divergence_fwd(s, t, p, None, mask, structure, consts)[1]
    ref = torch.ops.kdplug.divergence_bwd(scale, s, t, p, None, mask, stats, structure, consts)
    return grad, ref
ok = []
g1, r1 = fwd_grad(0)
ok.append(torch.allclose(g1, r1, rtol=1e-5, atol=1e-9))
last = r1.data_ptr()
del g1, r1  # r1 freed last: the buffer the cache keeps
g2, r2 = fwd_grad(1)
ok.append(torch.allclose(g2, r2, rtol=1e-5, atol=1e-9))
reused = g2.data_ptr() == last
del g2, r2
g3, r3 = fwd_grad(2, n=16)  # a quarter of the size: a new mapping
ok.append(torch.allclose(g3, r3, rtol=1e-5, atol=1e-9))
print(all(ok), reused)
"""


@pytest.mark.parametrize("cache", ["1", "0"])
def test_gradient_buffer_cache(cache):
    """The CPU ops keep the last freed gradient buffer (>= 8 MiB) mapped and hand it out again to
    the next gradient of about its size; KDPLUG_GRAD_CACHE=0 unmaps every buffer. Either way each
    gradient holds its own call's values."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", GRAD_CACHE_SCRIPT], env=dict(os.environ, KDPLUG_GRAD_CACHE=cache),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    values_ok, reused = out.stdout.split()[-2:]
    assert values_ok == "True"
    if cache == "1":  # (off, a fresh mapping may still land at the address just unmapped)
        assert reused == "True"


def test_opcheck_fwd_grad():
    _, structure, consts, p = packed("amid", alpha=0.5)
    s, t = make_logits((5, 19), torch.float64, seed=6)
    mask = torch.tensor([True, True, False, True, True])
    scale = torch.randn(5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kdplug.divergence_fwd_grad.default, (s, t, p, None, mask, scale, structure, consts))
    with pytest.raises(RuntimeError, match="grad_scale must be a"):
        torch.ops.kdplug.divergence_fwd_grad(s, t, p, None, mask, scale.float(), structure, consts)
    bad = s.clone()
    bad[1] = NINF
    with pytest.raises(RuntimeError, match="student_logits has a row"):
        torch.ops.kdplug.divergence_fwd_grad(bad, t, p, None, mask, scale, structure, consts)


def _train_grad(name, backend, s, t, mask, *, reduction="mean", t2_scale=False, outer=None, **params):
    loss_fn = kdplug.get(name, backend=backend, reduction=reduction, t2_scale=t2_scale, temperature=1.5, **params)
    x = s.detach().clone().requires_grad_()
    extra = {"student_generated": torch.tensor([True, False])} if name == "distillm2" else {}
    loss = loss_fn(x, t, mask=mask, **extra)
    kinds = set()
    node = loss.grad_fn
    while node is not None and node.next_functions:  # the per-token node below the reduction
        kinds.add(type(node).__name__)
        node = node.next_functions[0][0]
    (outer(loss) if outer else loss).backward()
    return loss.detach(), x.grad, kinds


@pytest.mark.parametrize("reduction,t2_scale,outer", [
    ("mean", False, None), ("sum", False, None), ("batchmean", True, None), ("sequence", False, None),
    ("mean", False, lambda loss: 0.3 * loss), ("none", False, lambda loss: (loss * torch.arange(6.0).reshape(2, 3)).sum()),
    ("none", False, lambda loss: loss.sum()),
], ids=["mean", "sum", "batchmean-t2", "sequence", "mean-scaled", "none-weighted", "none-sum"])
@pytest.mark.parametrize("name", ["fkl", "taid", "amid", "akl", "abkd", "tvd", "distillm2"])
def test_gradient_computed_in_the_forward(name, reduction, t2_scale, outer):
    """Eager CPU training takes divergence_fwd_grad (a Split: its recipes' fwd_grad and
    fwd_grad_into, one gradient); whatever the reduction and any later scaling of the loss, the
    gradient is the PyTorch path's."""
    s, t = make_logits((2, 3, 41), torch.float32, seed=8)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    loss_c, grad_c, kinds = _train_grad(name, "compiled", s, t, mask, reduction=reduction, t2_scale=t2_scale,
                                        outer=outer)
    loss_t, grad_t, _ = _train_grad(name, "torch", s, t, mask, reduction=reduction, t2_scale=t2_scale, outer=outer)
    assert any("ForwardGrad" in k for k in kinds), kinds
    torch.testing.assert_close(loss_c, loss_t, rtol=3e-5, atol=3e-6)
    torch.testing.assert_close(grad_c, grad_t, rtol=1e-4, atol=3e-6 * grad_t.abs().max().item())
    assert (grad_c[~mask] == 0).all()


@pytest.mark.parametrize("name,params", [("amid", {"alpha": 0.5}), ("fkl", {}), ("taid", {})])
def test_gradient_in_the_forward_falls_back_when_the_prediction_cannot_be_used(name, params):
    """A row that expected no gradient but receives one, and a second backward through the graph,
    recompute the gradient with divergence_fwd_grad for the incoming gradient: the same bits both
    times, and divergence_bwd's values."""
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((4, 33), torch.float64, seed=9)
    mask = torch.tensor([True, True, True, False])
    weights = torch.tensor([1.0, -0.5, 2.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # row 1: a wrong prediction of 0
    x = s.clone().requires_grad_()
    loss, stats = _ops.recipe_loss(x, t, p, None, mask, structure, consts, expected=expected)
    assert "ForwardGrad" in type(loss.grad_fn).__name__
    (loss * weights).sum().backward(retain_graph=True)
    ref = torch.ops.kdplug.divergence_bwd(weights, s, t, p, None, mask, stats, structure, consts)
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-15)
    first, x.grad = x.grad, None
    (loss * weights).sum().backward()  # the kept gradient is gone: recomputed
    assert torch.equal(x.grad, first)


def _split_parts(name, student_generated):
    split = kdplug.get(name).recipe
    parts = []
    for recipe, rows in ((split.if_false, ~student_generated), (split.if_true, student_generated)):
        structure, consts = structure_and_consts(recipe, "exact")
        parts.append((params_tensor(recipe, 1.0, {}, torch.device("cpu")), None, rows, structure, consts))
    return parts


def test_split_gradient_in_the_forward():
    """A Split's recipes on their rows: fwd_grad_into fills its rows of the first recipe's gradient
    and leaves the others; a prediction that cannot be used recomputes it with the same ops (the
    same bits on a second backward) and gives the backward ops' values."""
    s, t = make_logits((6, 37), torch.float64, seed=13)
    flags = torch.tensor([True, False, True, True, False, False])
    mask = torch.tensor([True, True, False, True, True, True])
    parts = _split_parts("distillm2", flags)
    parts = [(p, tw, rows & mask, st, c) for p, tw, rows, st, c in parts]
    scale = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (p0, _, m0, st0, c0), (p1, _, m1, st1, c1) = parts
    loss0, stats0, grad = torch.ops.kdplug.divergence_fwd_grad(s, t, p0, None, m0, scale, st0, c0)
    before = grad.clone()
    loss1, stats1 = torch.ops.kdplug.divergence_fwd_grad_into(s, t, p1, None, m1, scale, st1, c1, grad)
    assert torch.equal(grad[~m1], before[~m1]) and (loss1[~m1] == 0).all() and (stats1[~m1] == 0).all()
    _, _, alone = torch.ops.kdplug.divergence_fwd_grad(s, t, p1, None, m1, scale, st1, c1)
    assert torch.equal(grad[m1], alone[m1])
    torch.library.opcheck(torch.ops.kdplug.divergence_fwd_grad_into.default,
                          (s, t, p1, None, m1, scale, st1, c1, grad.clone()))

    weights = torch.tensor([1.0, -0.5, 2.0, 4.0, 0.3, 1.2], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # row 1: wrongly 0
    x = s.clone().requires_grad_()
    loss, stats = _ops.split_recipe_loss(x, t, parts, expected=expected)
    assert "ForwardGradSplit" in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, loss0 + loss1, rtol=0, atol=0)
    (loss * weights).sum().backward(retain_graph=True)
    ref = torch.ops.kdplug.divergence_bwd(weights, s, t, p0, None, m0, stats0, st0, c0)
    torch.ops.kdplug.divergence_bwd_into(weights, s, t, p1, None, m1, stats1, st1, c1, ref)
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-15)
    first, x.grad = x.grad, None
    (loss * weights).sum().backward()  # the kept gradient is gone: recomputed
    assert torch.equal(x.grad, first)
    with pytest.raises(RuntimeError, match="grad must be a contiguous"):
        torch.ops.kdplug.divergence_fwd_grad_into(s, t, p1, None, m1, scale, st1, c1, grad.t().contiguous().t())


def test_no_gradient_in_the_forward_when_not_training():
    s, t = make_logits((3, 20), torch.float32, seed=2)
    loss_fn = kdplug.get("fkl", backend="compiled")
    with torch.no_grad():
        assert loss_fn(s.clone().requires_grad_(), t).grad_fn is None
    out = kdplug.get("fkl", backend="compiled", inplace_backward=True)(s.clone().requires_grad_(), t)
    assert "ForwardGrad" not in type(out.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("name", ["fkl", "amid", "abkd"])
def test_gradient_in_the_forward_bf16_scaled_loss(name):
    """bf16: a loss scaled by a power of two (loss / 4) rescales the kept gradient, exactly; any
    other factor (kd_ratio * kd + ...) and per-row weights recompute it, so that it is rounded
    once: within half a bf16 ulp of the float32 gradient for the same incoming gradient."""
    s, t = make_logits((2, 3, 41), torch.bfloat16, seed=12)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    weights = torch.tensor([[1.0, 2.0, -1.0], [0.5, 3.0, 1.5]])
    _, unscaled, _ = _train_grad(name, "compiled", s, t, mask, reduction="mean")
    _, quarter, _ = _train_grad(name, "compiled", s, t, mask, reduction="mean", outer=lambda loss: loss / 4)
    assert torch.equal(quarter, unscaled / 4)
    every = torch.ones_like(mask)
    for outer, reduction, m in [(lambda loss: 0.3 * loss, "mean", every), (lambda loss: 0.3 * loss, "mean", mask),
                                (lambda loss: (loss * weights).sum(), "none", mask)]:
        _, grad_c, _ = _train_grad(name, "compiled", s, t, m, reduction=reduction, outer=outer)
        _, grad_32, _ = _train_grad(name, "compiled", s.float(), t.float(), m, reduction=reduction, outer=outer)
        g, g32 = grad_c.double(), grad_32.double()
        half_ulp = torch.exp2(torch.floor(torch.log2(g32.abs().clamp_min(1e-30))) - 8)  # bf16: 8 significant bits
        assert ((g - g32).abs() <= half_ulp * 1.01 + 1e-12).all(), f"{name}: bf16 gradient rounded twice"
