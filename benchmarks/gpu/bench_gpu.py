"""GPU benchmark of kdplug's compiled core (called by run_gpu_checks.sh; runs alone too).

    python benchmarks/gpu/bench_gpu.py --out benchmarks/gpu/results_h200.md [--quick]

Per method, dtype (bf16, fp32) and mode (forward only, forward + backward), at N = 16384 and
V = 128256: median time (CUDA events), effective bandwidth against the physical minimum (reading
both logits once, plus writing the gradient once with backward: 3·N·V·bytes; 2·N·V·bytes forward
only), that as a fraction of the device's measured copy bandwidth, and the peak memory allocated
above the inputs in units of one N x V tensor of the input dtype. Implementations: kdplug compiled
(CUDA kernels), naive eager PyTorch (kdplug._bench._naive: log_softmax / softmax, then
elementwise; what the peers write), torch.compile of that naive code (a few methods: compiling
takes most of the time budget), and Liger-Kernel's LigerKLDIVLoss / LigerJSD as peers ("full"
pipeline: log_softmax, Liger op, backward) when ``import liger_kernel`` works. Then the cliff
check: kdplug's time per element at V = 32000 and V = 262144 (same N·V). Every case is guarded: an
error (out of memory, a missing peer) becomes a cell, not a crash. Installs nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import torch

METHODS = ("fkl", "rkl", "symmetric_kl", "tvd", "gjsd", "skl", "srkl", "abkd", "akl", "taid", "amid", "distillm2")
COMPILE_METHODS = ("fkl", "tvd", "skl")  # torch.compile peer (each compile costs ~10-60 s)


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def copy_bandwidth(gib: float = 4.0) -> float:
    """Measured device bandwidth (bytes/s): a large device-to-device copy (read + write)."""
    n = int(gib * 2**30) // 4
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n * 4 / best


def make_inputs(n: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    teacher = torch.randn(n, v, device="cuda", generator=g) * 3
    idx = torch.randint(0, v, (n, 4), device="cuda", generator=g)
    teacher.scatter_add_(1, idx, 12 + 12 * torch.rand(n, 4, device="cuda", generator=g))
    student = (0.8 * teacher + 1.8 * torch.randn(n, v, device="cuda", generator=g)).to(dtype)
    return student, teacher.to(dtype)


def loss_fn(method: str, impl: str):
    """A callable (student, teacher) -> scalar loss, or raises (a missing peer)."""
    if impl == "kdplug":
        import kdplug
        fn = kdplug.get(method, backend="compiled")
        if method == "distillm2":
            return lambda s, t: fn(s[None], t[None], student_generated=torch.tensor([False], device="cuda"))
        return fn
    if impl in ("eager", "compile"):
        from kdplug._bench import _naive
        naive = _naive(method)
        if impl == "compile":
            naive = torch.compile(naive)
        return lambda s, t: naive(s, t).mean()
    if impl == "liger":
        if method == "fkl":
            from liger_kernel.transformers import LigerKLDIVLoss
            op = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            # KL(p || q) as nn.KLDivLoss: input = log q (student), target = log p (teacher)
            return lambda s, t: op(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
        if method == "gjsd":
            from liger_kernel.transformers import LigerJSD
            op = LigerJSD(beta=0.5)
            return lambda s, t: op(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))
        raise NotImplementedError(f"no Liger peer for {method}")
    raise ValueError(impl)


def measure(fn, student, teacher, backward: bool, reps: int) -> dict:
    """Median seconds over `reps` runs after a warm-up; peak bytes allocated above the inputs."""
    def once():
        if backward:
            s = student.detach().requires_grad_()
            fn(s, teacher).backward()
        else:
            with torch.no_grad():
                fn(student, teacher)

    once()  # warm-up (compilation, autotuning)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        once()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    peak = torch.cuda.max_memory_allocated() - base
    return {"median_s": statistics.median(times), "times_s": times, "peak_bytes": peak}


def run_case(method, impl, n, v, dtype, backward, reps, inputs) -> dict:
    try:
        fn = loss_fn(method, impl)
        r = measure(fn, *inputs, backward, reps)
    except NotImplementedError as exc:
        return {"skip": str(exc)}
    except Exception as exc:  # noqa: BLE001  (OOM, a missing peer, a kernel error: report, go on)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    elem = torch.finfo(dtype).bits // 8
    floor_bytes = (3 if backward else 2) * n * v * elem
    r["gbps"] = floor_bytes / r["median_s"] / 1e9
    r["peak_nv"] = r["peak_bytes"] / (n * v * elem)
    return r


def cell(r, bw):
    if r is None:
        return ""
    if "skip" in r:
        return "n/a"
    if "error" in r:
        return "error: " + r["error"][:60]
    return (f"{r['median_s'] * 1e3:.2f} ms, {r['gbps']:.0f} GB/s ({100 * r['gbps'] * 1e9 / bw:.0f}%), "
            f"{r['peak_nv']:.2f} NxV")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/gpu/results.md")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer methods and no torch.compile peer")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--compile-methods", default=",".join(COMPILE_METHODS))
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new cases after this")
    args = ap.parse_args(argv)
    t0 = time.time()
    methods = args.methods.split(",") if not args.quick else ["fkl", "skl", "taid", "amid"]
    compile_methods = [] if args.quick else [m for m in args.compile_methods.split(",") if m]
    try:
        import liger_kernel  # noqa: F401
        have_liger = True
    except Exception:  # noqa: BLE001
        have_liger = False
    import kdplug._extension as ext
    info = ext.build_info()
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    header = {
        "device": dev.name, "sms": dev.multi_processor_count, "memory_gib": round(dev.total_memory / 2**30, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda, "kdplug_build": info,
        "copy_bandwidth_gbps": round(bw / 1e9, 1), "liger": have_liger,
    }
    log("device:", json.dumps(header, default=str))
    results = []

    def over_budget():
        return time.time() - t0 > args.budget_s

    for dtype in (torch.bfloat16, torch.float32):
        inputs = make_inputs(args.n, args.v, dtype)
        for backward in (False, True):
            for method in methods:
                impls = ["kdplug", "eager"]
                if method in compile_methods and backward:
                    impls.append("compile")
                if have_liger and method in ("fkl", "gjsd"):
                    impls.append("liger")
                for impl in impls:
                    if over_budget() and impl != "kdplug":
                        continue
                    reps = args.reps if impl == "kdplug" else max(2, args.reps - 2)
                    r = run_case(method, impl, args.n, args.v, dtype, backward, reps, inputs)
                    r.update(method=method, impl=impl, dtype=str(dtype).split(".")[-1], backward=backward,
                             n=args.n, v=args.v)
                    log(f"{r['dtype']} {'fwd+bwd' if backward else 'fwd'} {method} {impl}: {cell(r, bw)}")
                    results.append(r)
        del inputs
        torch.cuda.empty_cache()

    # the cliff: time per element at V = 32000 vs 262144, same N·V (kdplug, bf16, fwd+bwd)
    cliff = []
    for method in ("fkl", "skl", "amid"):
        per_elem = {}
        for v in (32000, 262144):
            n = max(1, args.n * args.v // v)
            if over_budget():
                break
            inputs = make_inputs(n, v, torch.bfloat16)
            r = run_case(method, "kdplug", n, v, torch.bfloat16, True, args.reps, inputs)
            del inputs
            torch.cuda.empty_cache()
            if "median_s" in r:
                per_elem[v] = r["median_s"] / (n * v)
            log(f"cliff {method} V={v} N={n}: {cell(r, bw)}")
        if len(per_elem) == 2:
            cliff.append((method, per_elem[32000], per_elem[262144], per_elem[262144] / per_elem[32000]))

    write(args.out, header, results, cliff, bw)
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump({"header": header, "results": results, "cliff": cliff}, f, indent=1, default=str)
    log(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


def write(path, header, results, cliff, bw):
    impls = ["kdplug", "eager", "compile", "liger"]
    titles = {"kdplug": "kdplug compiled (CUDA)", "eager": "naive eager", "compile": "torch.compile(naive)",
              "liger": "Liger (log_softmax + op)"}
    lines = [f"# kdplug GPU benchmark: {header['device']}", "",
             f"torch {header['torch']} (CUDA {header['cuda']}), {header['sms']} SMs, "
             f"{header['memory_gib']} GiB; measured copy bandwidth {header['copy_bandwidth_gbps']} GB/s "
             f"(the % below is of this). kdplug build: backends {header['kdplug_build'].get('backends')}, "
             f"archs {header['kdplug_build'].get('cuda_archs')}.", "",
             "Cell: median time, effective GB/s against the minimum traffic (2·N·V·bytes forward, "
             "3·N·V·bytes forward+backward) and its % of the copy bandwidth, peak memory allocated "
             "above the inputs in N x V tensors of the input dtype.", ""]
    for dtype in ("bfloat16", "float32"):
        for backward in (False, True):
            rows = [r for r in results if r["dtype"] == dtype and r["backward"] == backward]
            if not rows:
                continue
            n, v = rows[0]["n"], rows[0]["v"]
            used = [i for i in impls if any(r["impl"] == i for r in rows)]
            lines += [f"## {dtype}, {'forward + backward' if backward else 'forward only'}, N={n}, V={v}", "",
                      "| method | " + " | ".join(titles[i] for i in used) + " | kdplug speed-up vs eager |",
                      "|---|" + "---|" * (len(used) + 1)]
            for method in dict.fromkeys(r["method"] for r in rows):
                by = {r["impl"]: r for r in rows if r["method"] == method}
                k, e = by.get("kdplug", {}), by.get("eager", {})
                speed = f"{e['median_s'] / k['median_s']:.1f}x" if "median_s" in k and "median_s" in e else ""
                lines.append(f"| {method} | " + " | ".join(cell(by.get(i), bw) for i in used) + f" | {speed} |")
            lines.append("")
    if cliff:
        lines += ["## No cliff: kdplug time per element, bf16, forward + backward (same N·V)", "",
                  "| method | V=32000 (ns/elem) | V=262144 (ns/elem) | ratio (target <= 1.15) |", "|---|---|---|---|"]
        for method, a, b, ratio in cliff:
            lines.append(f"| {method} | {a * 1e9:.4f} | {b * 1e9:.4f} | {ratio:.2f} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
