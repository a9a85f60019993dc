"""AKL's head/tail token weights: the compiled op (torch.ops.kdplug.head_tail_weights) against the
rule written out in float64 (tests/reference.py: stable sorts, running sums), HeadTailWeights as
data, and where KDLoss takes the op.

The op computes in float32 for float32 / bf16 / fp16 logits, so its reference is the rule on the
float32 log-probabilities (what the PyTorch path feeds it); float64 logits are compared with the
float64 rule.
"""
from __future__ import annotations

import pytest
import torch

import kdplug
import reference as ref
from kdplug import HeadTailWeights, Recipe, Term, _extension, _ops

pytestmark = pytest.mark.skipif(not _ops.HAS_OPS, reason=f"compiled core not built: {_extension.why_not()}")

NINF = float("-inf")
RULE = {"descending": "official", "ascending": "kdflow"}


def rows(kind, n, V, seed):
    """Teacher and student logits (float64) of one kind, n rows of V."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # many exactly equal probabilities, at the head's boundary too
        t = torch.randint(-2, 3, (n, V), generator=g).double() * 1.3
    elif kind == "uniform":  # the longest head (half the row)
        t = torch.zeros(n, V, dtype=torch.float64)
    elif kind == "peaked":  # the top entry alone holds more than mu
        t = torch.randn(n, V, generator=g, dtype=torch.float64)
        t[:, V // 2] += 12.0
    elif kind == "wide":
        t = torch.randn(n, V, generator=g, dtype=torch.float64) * 4
    else:
        t = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    s = t + torch.randn(n, V, generator=g, dtype=torch.float64)
    if kind == "ninf" and V > 3:
        t[:, : V // 3] = NINF  # teacher zeros (never in the head; ascending: the tail's start)
        s[0, -1] = NINF        # a student zero where the teacher is not
        s[1:, 1] = NINF        # zeros on both sides
    return s, t


def expected(s, t, T, mu, order):
    """The rule in float64 on the (rounded) logits."""
    lp = torch.log_softmax(t.double() / T, -1)
    lq = torch.log_softmax(s.double() / T, -1)
    return ref.akl_weights(lp, lq, mu, RULE[order])


def op(s, t, T, mu, order, mask=None):
    mask = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask
    return torch.ops.kdplug.head_tail_weights(s, t, mask, T, mu, order == "descending")


@pytest.mark.parametrize("order", ["descending", "ascending"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", ["random", "ties", "uniform", "peaked", "wide", "ninf"])
@pytest.mark.parametrize("V", [1, 2, 7, 33, 130])
def test_op_matches_the_rule(kind, V, dtype, order):
    s, t = rows(kind, 5, V, seed=V)
    s, t = s.to(dtype), t.to(dtype)
    # float64: a peaked row's top gap is p |expm1(lq - lp)| with lq - lp ~ 1e-7, which log_softmax's
    # rounding (1e-16 absolute) already moves by ~1e-9 relative in the reference
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for T in (1.0, 0.7):
        for mu in (1e-4, 0.23, 0.47, 0.81, 1 - 1e-4):  # no running sum of a uniform row lands on mu
            got = op(s, t, T, mu, order)
            assert got.dtype == torch.float64 and got.shape == (5, 2)
            torch.testing.assert_close(got, expected(s, t, T, mu, order), **tol,
                                       msg=lambda m: f"{kind} V={V} T={T} mu={mu}: {m}")


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_long_rows(order):
    """A row of a real vocabulary's width: long heads (flat rows) and peaked ones."""
    V = 50_000
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, V, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [1.0]])
    t[3, 17] += 20.0
    s = t + torch.randn(4, V, generator=g)
    torch.testing.assert_close(op(s, t, 1.0, 0.5, order), expected(s, t, 1.0, 0.5, order), rtol=2e-5, atol=2e-6)


def test_peaked_rows_keep_the_top_gap():
    """Teacher and student both near one-hot: the top entry's gap is 1 - q_top, which p - q in
    float32 rounds to 0 (the weights would be (0, 1)); the tail's gaps sum to about the same."""
    t = torch.tensor([[0.0, -25.0, -26.0, -24.0]])
    s = torch.tensor([[0.0, -18.0, -30.0, -19.0]])
    torch.testing.assert_close(op(s, t, 1.0, 0.5, "descending"), expected(s.double(), t.double(), 1.0, 0.5,
                                                                          "descending"), rtol=1e-5, atol=1e-7)


def test_masked_rows_are_never_read_and_bad_rows_are_left_to_the_loss():
    s, t = rows("random", 4, 9, seed=1)
    s, t = s.float(), t.float()
    s[1] = float("nan")
    t[2] = float("nan")
    mask = torch.tensor([True, False, False, True])
    got = op(s, t, 1.0, 0.5, "descending", mask)
    torch.testing.assert_close(got[[0, 3]], expected(s[[0, 3]], t[[0, 3]], 1.0, 0.5, "descending"),
                               rtol=2e-5, atol=2e-6)
    assert got[1].tolist() == got[2].tolist() == [0.5, 0.5]
    # an unmasked all -inf row gets (1/2, 1/2) here; divergence_fwd is what raises on it
    t[0] = NINF
    assert op(s, t, 1.0, 0.5, "descending", mask)[0].tolist() == [0.5, 0.5]


def test_strided_rows_and_empty_input():
    s, t = rows("random", 6, 40, seed=2)
    wide_s = torch.zeros(6, 64, dtype=torch.float64)
    wide_t = torch.zeros(6, 64, dtype=torch.float64)
    wide_s[:, 3:43], wide_t[:, 10:50] = s, t
    got = op(wide_s[:, 3:43], wide_t[:, 10:50], 1.3, 0.4, "descending")
    torch.testing.assert_close(got, op(s, t, 1.3, 0.4, "descending"), rtol=0, atol=0)
    assert op(s[:0], t[:0], 1.0, 0.5, "descending").shape == (0, 2)


def test_deterministic_across_thread_counts():
    s, t = rows("wide", 64, 3000, seed=4)
    s, t = s.float(), t.float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(s, t, 1.0, 0.5, "descending")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, op(s, t, 1.0, 0.5, "descending"))


def test_bad_arguments_raise():
    s, t = rows("random", 2, 5, seed=0)
    m = torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="mu must be in"):
        torch.ops.kdplug.head_tail_weights(s, t, m, 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match="temperature must be"):
        torch.ops.kdplug.head_tail_weights(s, t, m, 0.0, 0.5, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.kdplug.head_tail_weights(s, t.float(), m, 1.0, 0.5, True)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.kdplug.head_tail_weights(s, t[:, :4], m, 1.0, 0.5, True)
    with pytest.raises(RuntimeError, match="row_mask must be"):
        torch.ops.kdplug.head_tail_weights(s, t, m[:1], 1.0, 0.5, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.kdplug.head_tail_weights(s.t().contiguous().t(), t.t().contiguous().t(), m, 1.0, 0.5, True)


def test_opcheck():
    s, t = rows("ties", 3, 21, seed=5)
    m = torch.tensor([True, False, True])
    torch.library.opcheck(torch.ops.kdplug.head_tail_weights.default, (s.float(), t.float(), m, 1.5, 0.5, True))
    torch.library.opcheck(torch.ops.kdplug.head_tail_weights.default, (s, t, m, 1.0, 0.3, False))


def test_head_tail_weights_arguments():
    with pytest.raises(ValueError, match="HeadTailWeights.mu"):
        HeadTailWeights(mu=1.0)
    with pytest.raises(ValueError, match="HeadTailWeights.order"):
        HeadTailWeights(order="up")
    with pytest.raises(ValueError, match="two terms"):
        Recipe((Term("teacher", "student"),), token_weights=HeadTailWeights())


@pytest.mark.parametrize("variant", ["official", "kdflow"])
def test_akl_takes_the_op_on_the_compiled_path_only(monkeypatch, variant):
    """The compiled AKL never calls the PyTorch weights; backend="torch" always does; both agree."""
    s, t = rows("random", 6, 300, seed=6)
    s, t = s.float(), t.float()
    out_t = kdplug.get("akl", variant=variant, backend="torch", reduction="none")(s, t)
    torch_weights = HeadTailWeights.__call__

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch head/tail weights ran on the compiled path")

    monkeypatch.setattr(HeadTailWeights, "__call__", refuse)
    out_c = kdplug.get("akl", variant=variant, backend="compiled", reduction="none")(s, t)
    torch.testing.assert_close(out_c, out_t, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="PyTorch head/tail"):
        kdplug.get("akl", variant=variant, backend="torch", reduction="none")(s, t)
    monkeypatch.setattr(HeadTailWeights, "__call__", torch_weights)


def test_third_party_recipe_with_head_tail_weights():
    """HeadTailWeights on other terms (here TVD on the head's side, reverse KL on the tail's) runs
    compiled, with the op's weights, and matches the PyTorch path."""
    recipe = Recipe((Term("teacher", "student", "tvd"), Term("student", "teacher", weight=0.5)),
                    token_weights=HeadTailWeights(mu=0.3))
    method = kdplug.Method("head_tail_tvd_test", build=lambda: recipe)
    s, t = rows("wide", 7, 257, seed=7)
    s, t = s.float(), t.float()
    losses = {}
    for backend in ("compiled", "torch"):
        fn = kdplug.KDLoss(method, backend=backend, reduction="none", temperature=1.3)
        x = s.clone().requires_grad_()
        out = fn(x, t)
        out.sum().backward()
        losses[backend] = (out.detach(), x.grad)
    torch.testing.assert_close(losses["compiled"][0], losses["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["compiled"][1], losses["torch"][1], rtol=1e-4, atol=1e-6)
    lp, lq = torch.log_softmax(t.double() / 1.3, -1), torch.log_softmax(s.double() / 1.3, -1)
    w = ref.akl_weights(lp, lq, 0.3, "official")
    want = w[:, 0] * 0.5 * (lp.exp() - lq.exp()).abs().sum(-1) + w[:, 1] * 0.5 * (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(losses["compiled"][0].double(), want, rtol=1e-5, atol=1e-6)


def test_akl_without_the_extension_takes_the_pytorch_weights(monkeypatch):
    """With the compiled ops missing, AKL's auto backend computes its weights in PyTorch (the op is
    never called) and gives the PyTorch path's loss."""
    s, t = rows("random", 4, 50, seed=8)
    s, t = s.float(), t.float()
    want = kdplug.get("akl", backend="torch", reduction="none")(s, t)
    monkeypatch.setattr(_ops, "HAS_OPS", False)
    monkeypatch.setattr(_extension, "has_ops", lambda: False)
    monkeypatch.setattr(_extension, "why_not", lambda: "the compiled extension kdplug._C could not be loaded (test)")
    _extension.warn_fallback.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("head_tail_weights op called without the extension")

    monkeypatch.setattr(_ops, "head_tail_weights", refuse)
    assert not _ops.has_head_tail_kernel(s, t)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        got = kdplug.get("akl", reduction="none")(s, t)
    _extension.warn_fallback.cache_clear()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
