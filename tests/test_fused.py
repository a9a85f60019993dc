"""loss_fn.fused(hidden, weight, bias, teacher=...) equals the unfused loss for every method."""
import pytest
import torch

import kdplug
from _common import compiled_available

METHODS = [m.name for m in kdplug.list_methods()]


def _extra(name):
    return {"student_generated": torch.tensor([True, False])} if name == "distillm2" else {}


def _problem(dtype=torch.float64, seed=0, B=2, T=5, H=16, V=41, Ht=12):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype)
    W = (torch.randn(V, H, generator=g, dtype=dtype) / 3)
    b = torch.randn(V, generator=g, dtype=dtype)
    th = torch.randn(B, T, Ht, generator=g, dtype=dtype)
    tW = torch.randn(V, Ht, generator=g, dtype=dtype) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    return h, W, b, th, tW, labels


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("reduction", ["mean", "sequence", "sum", "batchmean"])
@pytest.mark.parametrize("name", METHODS)
def test_fused_equals_unfused(name, reduction):
    h, W, b, th, tW, labels = _problem()
    leaves = [x.requires_grad_() for x in (h, W, b)]
    fn = kdplug.get(name, reduction=reduction, temperature=1.5)
    dense = fn(h @ W.T + b, th @ tW.T, labels=labels, **_extra(name))
    g_dense = _grads(dense, leaves)
    for teacher in ((th, tW), th @ tW.T):
        fused = fn.fused(h, W, b, teacher=teacher, labels=labels, chunk_size=3, **_extra(name))
        torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
        for a, e in zip(_grads(fused, leaves), g_dense):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_fused_with_a_topk_teacher_and_num_items():
    h, W, b, th, tW, labels = _problem(seed=1)
    leaves = [x.requires_grad_() for x in (h, W)]
    values, ids = torch.log_softmax(th @ tW.T, -1).topk(6, -1)
    teacher = kdplug.TopK(ids, values)
    fn = kdplug.get("amid")
    dense = fn(h @ W.T, teacher, labels=labels, num_items=17)
    fused = fn.fused(h, W, teacher=teacher, labels=labels, num_items=17, chunk_size=4)
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    for a, e in zip(_grads(fused, leaves), _grads(dense, leaves)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_half_precision_uses_fp32_logits(dtype, teacher_dtype):
    """bf16 hidden states and weight: the logits reach the divergence in fp32 (not rounded to bf16);
    bf16 teacher logits are widened to meet them, so the compiled core runs on the chunks."""
    h, W, b, th, tW, labels = _problem(dtype=torch.float32, seed=2, V=64)
    h, W = h.to(dtype), W.to(dtype)
    leaves = [x.requires_grad_() for x in (h, W)]
    fn = kdplug.get("fkl", backend="compiled" if compiled_available() else "torch")
    teacher = (th @ tW.T).to(teacher_dtype)
    reference = fn(h.float() @ W.float().T, teacher.float(), labels=labels)  # fp32 logits from the same inputs
    g_ref = _grads(reference, leaves)
    fused = fn.fused(h, W, teacher=teacher, labels=labels, chunk_size=4)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for a, e in zip(_grads(fused, leaves), g_ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=1e-3)


def test_fused_chunking_is_automatic_and_invisible():
    h, W, b, th, tW, labels = _problem(seed=3, B=3, T=7)
    fn = kdplug.get("taid", t_start=0.5, t_end=0.5)
    a = fn.fused(h, W, b, teacher=(th, tW), labels=labels)
    c = fn.fused(h, W, b, teacher=(th, tW), labels=labels, memory_budget=3 * 41 * 4 * 2)  # 2 rows a chunk
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


def test_fused_masked_tokens_and_no_grad():
    h, W, b, th, tW, labels = _problem(seed=4)
    h = h.clone()
    mask = labels != -100
    h[~mask] = float("nan")  # never read by the loss; their gradient is 0
    hl = h.clone().requires_grad_()
    loss = kdplug.get("rkl").fused(hl, W, b, teacher=(th, tW), mask=mask, chunk_size=2)
    (g,) = torch.autograd.grad(loss, hl)
    assert torch.isfinite(loss) and (g[~mask] == 0).all() and torch.isfinite(g[mask]).all()
    with torch.no_grad():
        assert torch.isfinite(kdplug.get("rkl").fused(h, W, b, teacher=(th, tW), mask=mask))


def test_fused_errors():
    h, W, b, th, tW, labels = _problem()
    fn = kdplug.get("fkl")
    with pytest.raises(ValueError, match="scalar reduction"):
        kdplug.get("fkl", reduction="none").fused(h, W, teacher=(th, tW))
    with pytest.raises(ValueError, match="H=16"):
        fn.fused(h, W[:, :8], teacher=(th, tW))
    with pytest.raises(ValueError, match="V=41.*V=40"):
        fn.fused(h, W, teacher=(th, tW[:40]))
    with pytest.raises(ValueError, match="leading shape"):
        fn.fused(h, W, teacher=th[:1] @ tW.T)
    with pytest.raises(ValueError, match="student_bias"):
        fn.fused(h, W, b[:3], teacher=(th, tW))
    with pytest.raises(ValueError, match="chunk_size"):
        fn.fused(h, W, teacher=(th, tW), chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        fn.fused(h, W, teacher=(th, tW), memory_budget=0)
    with pytest.raises(ValueError, match=r"H_t=12 but its weight is \(41, 16\)"):
        fn.fused(h, W, teacher=(th, torch.randn(41, 16, dtype=th.dtype)))
    with pytest.raises(ValueError, match="teacher's bias"):
        fn.fused(h, W, teacher=(th, tW, torch.zeros(40, dtype=th.dtype)))
    # vocab_align reaches the fused path
    out = kdplug.get("fkl", vocab_align="truncate").fused(h, W, teacher=(th, tW[:40]))
    assert torch.isfinite(out)
