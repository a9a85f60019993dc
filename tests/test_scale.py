"""Top-k teachers, vocabulary alignment and accumulation-/data-parallel-exact counts."""
import pytest
import torch

import kdplug
from _common import spawn_gloo_ranks

METHODS = [m.name for m in kdplug.list_methods()]
NEG_INF = float("-inf")


def _extra(name, lead):
    if name == "distillm2":
        flags = torch.zeros(lead[:1], dtype=torch.bool)
        flags[0] = True
        return {"student_generated": flags}
    return {}


def _inputs(shape=(2, 3, 37), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=dtype) * 2
    t = torch.randn(shape, generator=g, dtype=dtype) * 3
    return s, t


# ---- top-k teachers ---------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", METHODS)
def test_topk_with_k_equal_v_is_the_dense_loss(name, tail):
    s, t = _inputs()
    T = 1.7
    fn = kdplug.get(name, temperature=T, reduction="none")
    lp = torch.log_softmax(t / T, -1)
    values, ids = lp.sort(-1, descending=True)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    w = torch.rand(s.shape[:-1], dtype=s.dtype)
    dense = fn(s1, t, **_extra(name, s.shape[:-1]))
    sparse = fn(s2, kdplug.TopK(ids, values, tail=tail), **_extra(name, s.shape[:-1]))
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    (dense * w).sum().backward()
    (sparse * w).sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_topk_bucket_matches_a_hand_written_reference(name):
    """k < V, bucket: teacher = its k probabilities + the missing mass; student = q at the ids +
    its mass elsewhere (normalized over the full row)."""
    s, t = _inputs((4, 50), seed=1)
    k = 7
    lp_full = torch.log_softmax(t, -1)
    values, ids = lp_full.topk(k, -1)
    loss = kdplug.get(name, reduction="none")(s, kdplug.TopK(ids, values))
    q_full = torch.softmax(s, -1)
    p = torch.cat([values.exp(), 1 - values.exp().sum(-1, keepdim=True)], -1)
    q_in = q_full.gather(-1, ids)
    q = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    expected = {"fkl": (p * (p / q).log()).sum(-1), "rkl": (q * (q / p).log()).sum(-1),
                "tvd": 0.5 * (p - q).abs().sum(-1)}[name]
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_topk_renormalize_and_logits_kind():
    s, t = _inputs((3, 40), seed=2)
    k = 5
    logits, ids = t.topk(k, -1)
    loss = kdplug.get("fkl", temperature=2.0, reduction="none")(s, kdplug.TopK(ids, logits, kind="logits",
                                                                                tail="renormalize"))
    p = torch.softmax(logits / 2.0, -1)
    q = torch.softmax(torch.log_softmax(s / 2.0, -1).gather(-1, ids), -1)
    torch.testing.assert_close(loss, (p * (p / q).log()).sum(-1), rtol=1e-10, atol=1e-12)


def test_topk_retempering_is_exact_for_the_ids():
    """Log-probs stored at T0 = 2, loss at T = 1: p_T ∝ p_T0^(T0/T) over the ids (k = V: dense)."""
    s, t = _inputs((3, 30), seed=3)
    stored = torch.log_softmax(t / 2.0, -1)
    values, ids = stored.sort(-1, descending=True)
    fn = kdplug.get("fkl", temperature=1.0, reduction="none")
    sparse = fn(s, kdplug.TopK(ids, values, tail="renormalize", temperature=2.0))
    torch.testing.assert_close(sparse, fn(s, t), rtol=1e-10, atol=1e-12)


def test_topk_masked_rows_are_not_read_and_gradients_are_finite():
    s, t = _inputs((2, 4, 64), seed=4, dtype=torch.float32)
    values, ids = torch.log_softmax(t, -1).topk(6, -1)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    values = values.clone()
    values[~mask] = float("nan")
    s = s.clone()
    s[~mask] = float("nan")
    s.requires_grad_()
    for name in METHODS:
        loss = kdplug.get(name)(s, kdplug.TopK(ids, values), mask=mask, **_extra(name, (2, 4)))
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad[mask]).all(), name
        assert (grad[~mask] == 0).all(), name


@pytest.mark.skipif(not kdplug._extension.has_ops(), reason="compiled core not built")
def test_topk_runs_on_the_compiled_core():
    s, t = _inputs((3, 33), seed=5, dtype=torch.float32)
    values, ids = torch.log_softmax(t, -1).topk(8, -1)
    a = kdplug.get("amid", backend="compiled", reduction="none")(s, kdplug.TopK(ids, values))
    b = kdplug.get("amid", backend="torch", reduction="none")(s, kdplug.TopK(ids, values))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_topk_errors_name_the_problem():
    s, t = _inputs((3, 20))
    values, ids = t.topk(4, -1)
    with pytest.raises(ValueError, match="kind='logits'"):
        kdplug.TopK(ids, values, kind="logits")
    with pytest.raises(ValueError, match="tail"):
        kdplug.TopK(ids, values, tail="uniform")
    with pytest.raises(ValueError, match="same shape"):
        kdplug.TopK(ids[:, :3], values)
    with pytest.raises(TypeError, match="indices"):
        kdplug.TopK(ids.float(), values)
    with pytest.raises(ValueError, match="leading shape"):
        kdplug.get("fkl")(s[:2], kdplug.TopK(ids, values))
    with pytest.raises(RuntimeError, match="TopK.indices"):
        kdplug.get("fkl")(s, kdplug.TopK(ids + 100, values))
    twice = ids.clone()
    twice[1, 2] = twice[1, 0]
    with pytest.raises(RuntimeError, match="distinct ids"):
        kdplug.get("fkl")(s, kdplug.TopK(twice, torch.log_softmax(values, -1)))
    mask = torch.tensor([True, False, True])  # a masked row is never read, repeated ids included
    kdplug.get("fkl")(s, kdplug.TopK(twice, torch.log_softmax(values, -1)), mask=mask)
    with pytest.raises(RuntimeError, match="kind='logits'"):  # raw logits passed as log-probabilities
        kdplug.get("fkl")(s, kdplug.TopK(ids, values + 5.0))
    lp = torch.log_softmax(t, -1).topk(4, -1).values
    kdplug.get("fkl")(s, kdplug.TopK(ids, lp + 1e-3))  # a little above 1 (rounding): the tail is 0


# ---- vocabulary alignment ----------------------------------------------------------------------
def test_vocab_mismatch_needs_an_explicit_choice():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="V=10.*V=12"):
        kdplug.get("fkl")(s, t)
    with pytest.raises(ValueError, match="vocab_align"):
        kdplug.get("fkl", vocab_align="zeros")


@pytest.mark.parametrize("name", ["fkl", "rkl", "amid"])
def test_vocab_align_truncate_and_pad(name):
    s, t = _inputs((2, 3, 12), seed=6)
    t_short = t[..., :10]
    truncated = kdplug.get(name, vocab_align="truncate", reduction="none")(s, t_short)
    torch.testing.assert_close(truncated, kdplug.get(name, reduction="none")(s[..., :10], t_short))
    # pad: the shorter side gets -inf columns (probability 0), never zeros
    s_pad = s.clone()
    s_pad[..., 10:] = NEG_INF
    padded = kdplug.get(name, vocab_align="pad", reduction="none")(s[..., :10], t)
    torch.testing.assert_close(padded, kdplug.get(name, reduction="none")(s_pad, t))
    x = s[..., :10].clone().requires_grad_()
    loss = kdplug.get("rkl", vocab_align="pad")(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


# ---- accumulation- and data-parallel-exact reductions -------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sequence", "batchmean"])
@pytest.mark.parametrize("name", ["fkl", "taid", "distillm2"])
def test_gradient_accumulation_matches_the_big_batch(name, reduction):
    s, t = _inputs((4, 5, 16), seed=7)
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 16, (4, 5), generator=g)
    labels[0, :3] = -100
    labels[2] = -100  # an empty sequence
    flags = torch.tensor([True, False, True, False])
    fn = kdplug.get(name, reduction=reduction)
    extra = (lambda sl: {"student_generated": flags[sl]}) if name == "distillm2" else (lambda sl: {})
    big = s.clone().requires_grad_()
    fn(big, t, labels=labels, **extra(slice(None))).backward()
    acc = s.clone().requires_grad_()
    halves = (slice(0, 2), slice(2, 4))
    sequences = reduction != "mean"
    count = kdplug.num_items(labels=[labels[h] for h in halves], sequences=sequences)
    for h in halves:
        fn(acc[h], t[h], labels=labels[h], num_items=count, **extra(h)).backward()
    torch.testing.assert_close(acc.grad, big.grad, rtol=1e-12, atol=1e-14)


def test_num_items_arguments():
    assert int(kdplug.num_items(mask=torch.tensor([[True, False], [True, True]]))) == 3
    assert int(kdplug.num_items(labels=torch.tensor([[1, -100]]), ignore_index=-100)) == 1
    assert int(kdplug.num_items(labels=[torch.zeros(3, 2), torch.zeros(5, 2)], sequences=True)) == 8
    with pytest.raises(ValueError, match="exactly one"):
        kdplug.num_items()


def _data_parallel_worker(rank, world, s, t, labels, out):
    shard = slice(rank * 2, rank * 2 + 2)
    x = s[shard].clone().requires_grad_()
    count = kdplug.num_items(labels=labels[shard])  # summed over the ranks
    kdplug.get("skl")(x, t[shard], labels=labels[shard], num_items=count).backward()
    out[shard] = x.grad


def test_data_parallel_ranks_match_the_big_batch():
    """Two gloo ranks with the global count: the concatenated gradients are the big batch's."""
    s, t = _inputs((4, 3, 11), seed=9)
    labels = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(10))
    labels[1] = -100
    labels[3, 0] = -100
    big = s.clone().requires_grad_()
    kdplug.get("skl")(big, t, labels=labels).backward()
    out = torch.zeros_like(s).share_memory_()
    spawn_gloo_ranks(_data_parallel_worker, 2, s, t, labels, out)
    torch.testing.assert_close(out, big.grad, rtol=1e-12, atol=1e-14)
