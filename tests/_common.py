"""What several test modules share: the built-in methods, the backends, one intra-op thread, gloo
ranks in spawned processes."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

import kdplug

# The registered built-in methods (from the registry, so a new one without a reference fails).
_BUILTIN_PLUGINS = {p.name for p in kdplug.list_plugins() if p.module.startswith("kdplug.plugins")}
METHODS = sorted(m.name for m in kdplug.list_methods() if m.plugin in _BUILTIN_PLUGINS)


def compiled_available():
    try:
        kdplug.get("fkl", backend="compiled")
    except RuntimeError:
        return False
    return True


BACKENDS = [pytest.param("torch"),
            pytest.param("compiled", marks=pytest.mark.skipif(not compiled_available(),
                                                              reason="compiled core not built"))]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tests run thousands of tiny ops; intra-op threads only add wake-up latency (and on a
    busy 2-core machine, a lot of it). Import it into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spawn_gloo_ranks(body, world, *args):
    """Run ``body(rank, world, *args)`` on ``world`` gloo ranks, each in a spawned process; results
    travel back through shared-memory tensors among ``args``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(body, world, port, *args), nprocs=world)


def _gloo_rank(rank, body, world, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        body(rank, world, *args)
        dist.barrier()  # no rank tears the group down while another still has collectives in flight
    finally:
        dist.destroy_process_group()
    # NB: leave without interpreter teardown. The group's worker threads can outlive
    # destroy_process_group (a DTensor mesh or a DDP module keeps the group), and a worker that
    # drops the last reference to a finished collective's tensors while the interpreter finalizes
    # cannot take the GIL: std::terminate, "terminate called without an active exception" (torch
    # 2.13; about 1 run in 12 of the DTensor test, core dump: ~AsyncBarrierWork on pt_gloo_runloop).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Parameter settings the compiled-core tests (CPU and CUDA) run for every registered method.
VARIANTS = {
    "fkl": [{}, {"form": "ce"}],
    "rkl": [{}],
    "symmetric_kl": [{}, {"lam": 0.3, "form": "ce"}],
    "tvd": [{}],
    "gjsd": [{}, {"beta": 0.1, "normalized": True}, {"beta": 0.0}],
    "skl": [{}, {"alpha": 0.0}, {"form": "ce"}],
    "srkl": [{}, {"detach_mixture": True}, {"alpha": 0.0}],
    "abkd": [{}, {"alpha": 0.0, "beta": 0.7}, {"alpha": 1.0, "beta": 0.0}, {"alpha": 0.0, "beta": 0.0}],
    "akl": [{}, {"variant": "kdflow"}],
    "taid": [{}, {"value": "kl", "t_start": 1.0}],
    "amid": [{}, {"alpha": -1.0, "order": "qr"}, {"alpha": 1.0, "divergence": "kl"},
             {"alpha": -3.0, "divergence": "kl", "order": "rq"}, {"alpha": 0.5, "lam": 0.0, "order": "rp"},
             {"alpha": 0.9, "lam": 1.0, "order": "pr"}, {"alpha": 1.5, "alpha_ge_1": "power_mean", "order": "qr"}],
    "distillm2": [{}, {"alpha_1": 0.0, "alpha_2": 0.3}],
}
CASES = [(name, params) for name in sorted(m.name for m in kdplug.list_methods()) for params in VARIANTS.get(name, [{}])]
CASE_IDS = [f"{name}-{','.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for name, p in CASES]


# Whether divergence_fwd_grad may compute a recipe's gradient from the forward's own exps
# (csrc/cpu/divergence_rows.h: every recipe without a mixture and without an AB term; the
# logit-space ones, a detached geometric mixture with KL / CE terms; in float32 and bfloat16, the
# arithmetic mixture's KL(p||r) / KL(q||r) terms; and the general alpha-mixture, whose r is its
# normalizer's kept exp). That gradient rounds a few ulp away from divergence_fwd +
# divergence_bwd's; the other recipes agree bit for bit.
def kept_exps(name, params) -> bool:
    recipe = kdplug.get(name, **params).recipe
    assistant = recipe.assistant
    kinds = [term.divergence.name for term in recipe.terms]
    if assistant is None:
        return "AB" not in kinds
    if assistant.alpha not in (-1.0, 1.0):
        return True
    if assistant.alpha == -1.0:
        return all(k == "KL" and term.rhs.value == "assistant" for k, term in zip(kinds, recipe.terms))
    return assistant.alpha == 1.0 and assistant.detach and all(k in ("KL", "CE") for k in kinds)


# dtype -> the relative tolerance between the two (of the loss, and of the gradient against its
# largest entry)
FWD_GRAD_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


# dtype -> (loss rtol, loss atol, grad rtol, grad atol relative to the largest gradient entry) of
# the compiled core against the PyTorch path (tests/test_compiled.py, tests/test_cuda.py).
# float32 gradients: gjsd(beta=0.1, normalized=True) cancels (u - q U with terms ~11x the result)
# to ~5e-6 of the largest entry on both paths, each against the float64 truth.
TOL = {
    torch.float64: (1e-9, 1e-11, 1e-8, 1e-11),
    torch.float32: (3e-5, 3e-6, 1e-4, 1e-5),
    torch.bfloat16: (3e-5, 3e-6, 1.6e-2, 1e-2),
    torch.float16: (3e-5, 3e-6, 2e-3, 2e-3),
}


def make_logits(shape, dtype=torch.float32, seed=0):
    """Student and teacher logits with a few confident teacher entries (both finite)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t[..., : min(3, shape[-1])] += 8  # a few confident entries
    s = 0.7 * t + torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    return s.to(dtype), t.to(dtype)


# ---- random configurations -----------------------------------------------------------------------
# The sweeps vary one axis at a time. random_case(seed) draws every axis at once: method and
# parameters (their endpoints included), temperature, inf policy, shape (V from 1 to a few
# thousand: several SIMD packs, segments of kept exps), dtype, strided rows, a -inf pattern, masked
# rows holding NaN and an incoming gradient (zero for some tokens), so that combinations no sweep
# names still meet the PyTorch path (tests/test_compiled.py) and the float64 reference
# (tests/test_methods.py).
def random_params(name, rng):
    u, pick = rng.random, rng.choice
    if name == "fkl":
        return {"form": pick(["kl", "ce"])}
    if name == "symmetric_kl":
        return {"lam": pick([0.0, 1.0, 0.9, u()]), "form": pick(["kl", "ce"])}
    if name == "gjsd":
        return {"beta": pick([0.0, 1.0, 0.5, u()]), "normalized": pick([False, True])}
    if name == "skl":
        return {"alpha": pick([0.0, 1.0, 0.1, u()]), "form": pick(["kl", "ce"])}
    if name == "srkl":
        return {"alpha": pick([0.0, 1.0, 0.1, u()]), "detach_mixture": pick([False, True])}
    if name == "abkd":
        return {"alpha": pick([0.0, 1.0, 0.2, 1.5 * u()]), "beta": pick([0.0, 1.0, 0.7, 1.5 * u()]),
                "limit_scale": pick(["continuous", "abkd_repo"])}
    if name == "akl":
        return {"mu": pick([0.5, u()]), "variant": pick(["official", "kdflow"])}
    if name == "taid":
        return {"t_start": pick([0.0, 1.0, 0.4, u()]), "value": pick(["ce", "kl"])}
    if name == "amid":
        return {"alpha": pick([-1.0, 1.0, 0.5, -3.0, 3.0, 2 * u() - 1]), "lam": pick([0.0, 1.0, 0.5, u()]),
                "divergence": pick(["ab", "kl"]), "order": pick(["pr", "rp", "qr", "rq"]),
                "alpha_ge_1": pick(["geometric", "power_mean"])}
    if name == "distillm2":
        return {"alpha_1": pick([0.0, 0.1, u()]), "alpha_2": pick([0.0, 0.1, u()])}
    return {}


def random_case(seed):
    """A dict: name, params, s and t (float64 [..., V]; the test rounds them to `dtype`), dtype,
    temperature, inf_policy, mask (or None; its False rows of s hold NaN), grad_out (float64, the
    leading shape, or None), strided (whether to pass rows of wider tensors) and pattern (the -inf
    pattern's name; "equal": s = t)."""
    import random

    rng = random.Random(seed)
    name = rng.choice(METHODS)
    case = {"name": name, "params": random_params(name, rng)}
    lead = rng.choice([(rng.randint(1, 5),), (2, rng.randint(1, 3))])
    V = rng.choice([1, 2, 3, 15, 16, 17, 31, 33, 100, 257, rng.randint(1, 600), rng.randint(1000, 4000)])
    case["dtype"] = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*lead, V, generator=g, dtype=torch.float64) * rng.choice([1.0, 3.0, 8.0])
    s = 0.7 * t + torch.randn(*lead, V, generator=g, dtype=torch.float64) * rng.choice([0.5, 2.0, 5.0])
    pattern = rng.choice(["none", "none", "padded", "teacher", "student", "both", "equal"])
    if pattern == "padded" and V > 1:
        k = rng.randint(1, V - 1)
        s[..., V - k:] = float("-inf")
        t[..., V - k:] = float("-inf")
    elif pattern in ("teacher", "student", "both"):
        hit = torch.rand(*lead, V, generator=g) < rng.choice([0.05, 0.4])
        hit[..., 0] = False  # every row keeps a finite entry on both sides
        if pattern != "student":
            t[hit] = float("-inf")
        if pattern != "teacher":
            s[hit] = float("-inf")
    elif pattern == "equal":  # the true gradient is 0: both paths return rounding noise
        s = t.clone()
    case["temperature"] = rng.choice([1.0, 0.5, 2.0, rng.uniform(0.3, 3.0)])
    case["inf_policy"] = rng.choice(["exact", "exclude"])
    case["mask"] = case["grad_out"] = None
    if rng.random() < 0.4:
        case["mask"] = torch.rand(lead, generator=g) < 0.7
        s[~case["mask"]] = float("nan")  # never read
    if rng.random() < 0.5:
        case["grad_out"] = torch.randn(lead, generator=g, dtype=torch.float64) * 2
        case["grad_out"][torch.rand(lead, generator=g) < 0.3] = 0.0
    case["strided"] = rng.random() < 0.3
    case["s"], case["t"], case["pattern"] = s, t, pattern
    return case


def strided_rows(s, t):
    """s and t as rows of wider tensors (row strides > V, different for the two sides)."""
    V = s.shape[-1]
    wide_s = torch.zeros(*s.shape[:-1], V + 5, dtype=s.dtype)
    wide_t = torch.zeros(*t.shape[:-1], V + 3, dtype=t.dtype)
    wide_s[..., 2:2 + V] = s
    wide_t[..., 1:1 + V] = t
    return wide_s[..., 2:2 + V], wide_t[..., 1:1 + V]
