"""The CUDA kernels of the compiled core, against the CPU kernels and the PyTorch path.

Skipped without a CUDA device (or when the extension was built without its CUDA kernels, which
``test_cuda_kernels_are_built`` reports as a failure on a machine that has a GPU). Every built-in
method (the variants of tests/test_compiled.py) runs on the GPU and on the CPU from the same
inputs; per-token losses and gradients must agree with the CPU compiled path and with the PyTorch
path to the tolerances of tests/test_compiled.py. Plus: odd vocabulary sizes (the 16-byte packs'
tails, V = 1), unaligned and strided rows (the scalar-load path, bitwise equal to the vector one),
-inf patterns, masked NaN rows, grad_output != 1, a zero incoming gradient, the one-pass forward
against the generic one, determinism, opcheck, torch.compile, and the rows that must fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import kdplug
from _common import CASE_IDS, CASES, TOL, VARIANTS, make_logits  # noqa: F401
from kdplug import _extension, _ops
from kdplug._pack import params_tensor, structure_and_consts

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = _ops.HAS_OPS and "cuda" in _ops.DEVICES

pytestmark = [
    pytest.mark.needs_cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
]
needs_kernels = pytest.mark.skipif(not CUDA_BUILT, reason=f"kdplug's CUDA kernels are not built "
                                                          f"({_extension.why_not() or _ops.DEVICES})")

NINF = float("-inf")
DEV = "cuda"

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]

# (TOL, from tests/_common.py, as tests/test_compiled.py: bf16 / fp16 gradients one rounding of the
# gradient's dtype apart)


def evaluate(name, params, s, t, backend, *, device, mask=None, inf_policy="exact", temperature=1.7,
             grad_out=None):
    """Per-token loss and the gradient of sum(grad_out * loss) w.r.t. s, computed on `device`
    (returned on the CPU)."""
    loss_fn = kdplug.get(name, backend=backend, temperature=temperature, inf_policy=inf_policy,
                         reduction="none", **params)
    s = s.detach().to(device).requires_grad_()
    t = t.to(device)
    extra = {}
    if name == "distillm2":
        extra["student_generated"] = (torch.arange(s.shape[0]) % 2 == 0).to(device)
    out = loss_fn(s, t, mask=None if mask is None else mask.to(device), **extra)
    if grad_out is None:
        grad_out = torch.linspace(-1.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * grad_out.to(device)).sum().backward()
    return out.detach().cpu(), s.grad.cpu()


def assert_close_pair(name, params, a, b, dtype, what):
    (out_a, grad_a), (out_b, grad_b) = a, b
    lr, la, gr, ga = TOL[dtype]
    assert out_a.dtype == out_b.dtype and grad_a.dtype == grad_b.dtype == dtype
    torch.testing.assert_close(out_a, out_b, rtol=lr, atol=la, msg=lambda m: f"{name}({params}) loss vs {what}: {m}")
    scale = grad_b.double().abs().max().item() or 1.0
    torch.testing.assert_close(grad_a.double(), grad_b.double(), rtol=gr, atol=ga * scale,
                               msg=lambda m: f"{name}({params}) gradient vs {what}: {m}")


def assert_match(name, params, s, t, **kw):
    """CUDA compiled vs CPU compiled vs PyTorch path (CPU); returns the CUDA result."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback on the compiled side
        gpu = evaluate(name, params, s, t, "compiled", device=DEV, **kw)
        cpu = evaluate(name, params, s, t, "compiled", device="cpu", **kw)
    ref = evaluate(name, params, s, t, "torch", device="cpu", **kw)
    assert not torch.isnan(gpu[0]).any() and torch.isfinite(gpu[1].double()).all()
    assert_close_pair(name, params, gpu, cpu, s.dtype, "CPU compiled")
    assert_close_pair(name, params, gpu, ref, s.dtype, "PyTorch path")
    return gpu


def test_cuda_kernels_are_built():
    if os.environ.get("KDPLUG_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("KDPLUG_NO_CUDA is set")
    assert CUDA_BUILT, (f"a CUDA device is present but kdplug._C has no CUDA kernels "
                        f"(backends {sorted(_ops.DEVICES)}; {_extension.why_not()}); rebuild with "
                        "pip install --no-build-isolation -e . on a machine with a CUDA build of torch and nvcc")
    info = _extension.build_info()
    assert "cuda" in info["backends"] and info["cuda_version"]
    assert _ops.why_cannot_run(torch.zeros(2, 3, device=DEV), torch.zeros(2, 3, device=DEV)) is None


# ---- the sweep -----------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_cpu_and_torch_path(name, params, dtype):
    s, t = make_logits((4, 3, 37), dtype)
    assert_match(name, params, s, t)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 1), (3, 2), (5, 7), (2, 8), (3, 9), (4, 17), (2, 129), (3, 1000),
                                   (2, 4099), (2, 32003)], ids=str)
@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "skl", "abkd", "amid", "taid", "symmetric_kl"])
def test_odd_shapes(name, shape, dtype):
    """V = 1, and V not a multiple of the 16-byte pack (4 fp32, 8 bf16 / fp16, 2 fp64): the tails."""
    s, t = make_logits(shape, dtype, seed=1)
    assert_match(name, {}, s, t)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["fkl", "rkl", "taid", "skl", "gjsd", "amid", "abkd", "tvd"])
def test_large_vocabulary(name, dtype):
    """V = 128256: many packs per thread (the prefetching loop), the full block; and many rows."""
    s, t = make_logits((3, 128256), dtype, seed=11)
    assert_match(name, {}, s, t)
    s, t = make_logits((700, 61), dtype, seed=12)
    assert_match(name, {}, s, t)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,params", [("fkl", {}), ("symmetric_kl", {}), ("amid", {"alpha": 0.5}),
                                         ("skl", {}), ("taid", {}), ("tvd", {})])
def test_unaligned_and_strided_rows(name, params, dtype):
    """Rows that are not 16-byte aligned (element loads) or evenly strided give the same bits as
    contiguous rows (vector loads): same packs, same per-thread order, same reduction tree."""
    wide_s, wide_t = make_logits((6, 300), dtype, seed=2)
    wide_s, wide_t = wide_s.to(DEV), wide_t.to(DEV)  # views of CUDA tensors (.to() would copy them dense)
    for s, t in [(wide_s[:, 5:261], wide_t[:, 3:259]),   # strided, unaligned
                 (wide_s[:, 8:264], wide_t[:, 16:272]),  # strided, aligned for 2-byte dtypes
                 (wide_s[:, :256], wide_t[:, 1:257])]:
        assert not s.is_contiguous()
        got = assert_match(name, params, s, t)
        ref = evaluate(name, params, s.contiguous(), t.contiguous(), "compiled", device=DEV)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


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


@needs_kernels
@pytest.mark.parametrize("inf_policy", ["exact", "exclude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_inf_patterns(name, params, dtype, inf_policy):
    s, t = inf_patterns(dtype)
    out, grad = assert_match(name, params, s, t, inf_policy=inf_policy)
    assert (grad[s == NINF] == 0).all(), "gradient at a -inf student logit"


@needs_kernels
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


@needs_kernels
def test_zero_incoming_gradient_is_exactly_zero():
    """A token whose loss is +inf still gets an exactly-zero gradient when its weight is 0."""
    s, t = inf_patterns(torch.float32)
    grad_out = torch.ones(5)
    grad_out[2] = 0  # row 2 has forward KL = +inf
    out, grad = evaluate("fkl", {}, s, t, "compiled", device=DEV, grad_out=grad_out)
    assert out[2] == float("inf")
    assert (grad[2] == 0).all() and torch.isfinite(grad).all()


@needs_kernels
def test_one_pass_forward_matches_generic(monkeypatch):
    """The one-pass forward of logit-space recipes against the generic passes (KDPLUG_NO_FUSED)."""
    s, t = inf_patterns(torch.float32)
    cases = [("fkl", {}), ("fkl", {"form": "ce"}), ("rkl", {}), ("symmetric_kl", {}), ("akl", {}),
             ("taid", {}), ("taid", {"t_start": 1.0, "value": "kl"})]
    for inf_policy in ("exact", "exclude"):
        for name, params in cases:
            fused = evaluate(name, params, s, t, "compiled", device=DEV, inf_policy=inf_policy)
            monkeypatch.setenv("KDPLUG_NO_FUSED", "1")
            generic = evaluate(name, params, s, t, "compiled", device=DEV, inf_policy=inf_policy)
            monkeypatch.delenv("KDPLUG_NO_FUSED")
            torch.testing.assert_close(fused[0], generic[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused[1], generic[1], rtol=1e-4, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_deterministic(dtype):
    """Two runs give the same bits (no atomics; a reduction tree fixed by V and the dtype)."""
    for shape in [(64, 50024), (16, 50021)]:  # 16-byte aligned rows (vector loads), and not
        s, t = make_logits(shape, dtype, seed=5)
        for name in ("fkl", "skl", "amid", "taid", "akl"):
            a = evaluate(name, {}, s, t, "compiled", device=DEV)
            b = evaluate(name, {}, s, t, "compiled", device=DEV)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (name, shape)


# ---- the ops themselves ----------------------------------------------------------------------------
def packed(name, device=DEV, **params):
    loss_fn = kdplug.get(name, **params)
    recipe = loss_fn.recipe if not hasattr(loss_fn.recipe, "if_true") else loss_fn.recipe.if_false
    structure, consts = structure_and_consts(recipe, "exact")
    values = loss_fn.schedule.value() if loss_fn.schedule is not None else {}
    return recipe, list(structure), list(consts), params_tensor(recipe, 1.3, values, torch.device(device))


@needs_kernels
@pytest.mark.parametrize("name,params", [("fkl", {}), ("amid", {"alpha": 0.5}), ("akl", {}), ("taid", {}),
                                         ("abkd", {"alpha": 0.0, "beta": 0.5}), ("skl", {})])
def test_opcheck(name, params):
    _, structure, consts, p = packed(name, **params)
    s, t = make_logits((5, 19), torch.float64, seed=6)
    s, t = s.to(DEV), t.to(DEV)
    mask = torch.tensor([True, True, False, True, True], device=DEV)
    tw = torch.rand(5, structure[3], dtype=torch.float64, device=DEV) if name == "akl" else None
    s.requires_grad_()
    torch.library.opcheck(torch.ops.kdplug.divergence_fwd.default, (s, t, p, tw, mask, structure, consts))
    _, stats = torch.ops.kdplug.divergence_fwd(s.detach(), t, p, tw, mask, structure, consts)
    g = torch.randn(5, dtype=torch.float64, device=DEV)
    torch.library.opcheck(torch.ops.kdplug.divergence_bwd.default,
                          (g, s.detach(), t, p, tw, mask, stats, structure, consts))


@needs_kernels
def test_ops_match_cpu_ops_and_row_stats():
    """The raw ops, CUDA vs CPU: loss, row_stats (same recipe path, same statistics) and gradient,
    with an expanded (stride 0) grad_loss."""
    for name in ("fkl", "taid", "skl", "amid", "tvd"):
        _, structure, consts, p = packed(name, device="cpu")
        s, t = make_logits((6, 77), torch.float32, seed=8)
        mask = torch.tensor([True, False, True, True, True, True])
        cpu = torch.ops.kdplug.divergence_fwd(s, t, p, None, mask, structure, consts)
        gpu = torch.ops.kdplug.divergence_fwd(s.to(DEV), t.to(DEV), p.to(DEV), None, mask.to(DEV), structure, consts)
        for a, b in zip(gpu, cpu):
            assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=3e-5, atol=3e-6, msg=lambda m: f"{name} loss: {m}")
        # the LSE columns (the others are sums whose form may differ between the two kernels' paths)
        torch.testing.assert_close(gpu[1][:, :2].cpu(), cpu[1][:, :2], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} row_stats: {m}")
        gl = torch.tensor(0.7).expand(6)
        g_cpu = torch.ops.kdplug.divergence_bwd(gl, s, t, p, None, mask, cpu[1], structure, consts)
        g_gpu = torch.ops.kdplug.divergence_bwd(gl.to(DEV), s.to(DEV), t.to(DEV), p.to(DEV), None, mask.to(DEV),
                                                gpu[1], structure, consts)
        assert g_gpu.dtype == s.dtype and g_gpu.is_contiguous()
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-4, atol=1e-6)


@needs_kernels
def test_unmasked_bad_rows_are_flagged_by_the_op():
    """The op itself: a row that is not masked but is all -inf (or holds NaN / +inf) gets a NaN loss
    and a non-finite row_stats LSE (no host sync); masked, the same row is fine."""
    _, structure, consts, p = packed("fkl")
    s, t = make_logits((4, 11), torch.float32)
    s[1] = NINF
    t[2, 3] = float("nan")
    t[3, 0] = float("inf")
    s, t = s.to(DEV), t.to(DEV)
    mask = torch.ones(4, dtype=torch.bool, device=DEV)
    loss, stats = torch.ops.kdplug.divergence_fwd(s, t, p, None, mask, structure, consts)
    loss, stats = loss.cpu(), stats.cpu()
    assert torch.isfinite(loss[0]) and torch.isfinite(stats[0, :2]).all()
    for n in (1, 2, 3):
        assert torch.isnan(loss[n]) and not torch.isfinite(stats[n, :2]).all(), n
    mask[1:] = False
    loss, stats = torch.ops.kdplug.divergence_fwd(s, t, p, None, mask, structure, consts)
    assert (loss[1:] == 0).all() and (stats[1:] == 0).all()


@needs_kernels
def test_unmasked_dead_rows_fail_through_kdloss():
    """Through KDLoss the flagged row fails (a device-side assert: it poisons the CUDA context, so
    in a subprocess)."""
    code = textwrap.dedent("""
        import torch, kdplug
        s = torch.randn(3, 11, device="cuda")
        t = torch.randn(3, 11, device="cuda")
        s[1] = float("-inf")
        loss = kdplug.get("fkl", backend="compiled")(s, t)
        torch.cuda.synchronize()
        print("NO ERROR", loss.item())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    ok = subprocess.run([sys.executable, "-c", code.replace('s[1] = float("-inf")', "")], capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and "NO ERROR" in ok.stdout, ok.stdout + ok.stderr


@needs_kernels
def test_bad_arguments_raise():
    _, structure, consts, p = packed("fkl")
    s, t = make_logits((2, 5), torch.float32)
    s, t = s.to(DEV), t.to(DEV)
    m = torch.ones(2, dtype=torch.bool, device=DEV)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.kdplug.divergence_fwd(s, t.double(), p, None, m, structure, consts)
    with pytest.raises(RuntimeError, match="invalid packed recipe"):
        torch.ops.kdplug.divergence_fwd(s, t, p, None, m, structure[:4], consts)
    with pytest.raises(RuntimeError, match="params must be"):
        torch.ops.kdplug.divergence_fwd(s, t, p.float(), None, m, structure, consts)
    with pytest.raises(RuntimeError, match="must be on the same device; params"):
        torch.ops.kdplug.divergence_fwd(s, t, p.cpu(), None, m, structure, consts)
    with pytest.raises(RuntimeError, match="must be on the same device; row_mask"):
        torch.ops.kdplug.divergence_fwd(s, t, p, None, m.cpu(), structure, consts)


# ---- torch.compile --------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("name", ["fkl", "skl", "taid", "amid", "akl", "distillm2"])
def test_torch_compile_training_step(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 48).to(DEV)
    x = torch.randn(2, 5, 16, device=DEV)
    teacher = torch.randn(2, 5, 48, device=DEV) * 2
    labels = torch.randint(0, 48, (2, 5), device=DEV)
    labels[0, 0] = -100
    loss_fn = kdplug.get(name, backend="compiled", temperature=1.5)
    extra = {"student_generated": torch.tensor([True, False], device=DEV)} if name == "distillm2" else {}

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


@needs_kernels
@pytest.mark.parametrize("name", ["fkl", "taid", "amid", "akl", "gjsd"])
def test_inplace_backward_and_log_ratio(name):
    """inplace_backward=True (divergence_bwd_inplace) and log_ratio_at= on CUDA equal the CPU results."""
    s, t = make_logits((3, 5, 37), torch.float32)
    ids = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(2))
    results = []
    for device in (DEV, "cpu"):
        x = s.to(device).requires_grad_()
        logits = x * 1
        loss, ratio = kdplug.get(name, backend="compiled", inplace_backward=True)(logits, t.to(device),
                                                                                 log_ratio_at=ids.to(device))
        loss.backward()
        torch.testing.assert_close(logits.detach(), x.grad)  # the logits now hold the gradient
        results.append((loss.detach().cpu(), ratio.cpu(), x.grad.cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
