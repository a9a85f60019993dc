"""Benchmark harness: kdplug (compiled, torch path) vs naive eager PyTorch and torch.compile of it.

Every case runs in a fresh subprocess so that its peak memory is its own: the resident high-water
mark (VmHWM, reset through /proc/self/clear_refs after the warm-up) minus the resident size once
the inputs exist (``mem``: it includes what the warm-up left resident, library code pages and
allocator caches among it), and minus the resident size after the warm-up (``steady``: what a call
adds on top: its temporaries), in units of one N x V tensor of the input dtype. Time is the median of
``--repeats`` runs after one warm-up. Effective GB/s counts the physical minimum for loss+grad,
reading both logits once and writing the gradient once (3·N·V·bytes; 2·N·V·bytes forward-only).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

IMPLS = ("compiled", "torch", "eager", "compile")
IMPL_TITLES = {"compiled": "kdplug compiled", "torch": "kdplug torch path",
               "eager": "naive eager", "compile": "torch.compile(naive)"}
DEFAULT_METHODS = ("fkl", "rkl", "symmetric_kl", "tvd", "gjsd", "skl", "srkl", "abkd", "akl", "taid",
                   "amid", "distillm2")


# --- naive implementations: what the peers write (log_softmax / softmax, then elementwise) --------
def _naive(method: str):
    def logs(s, t):
        return torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)

    def kl(lp, lq):
        return (lp.exp() * (lp - lq)).sum(-1)

    def mix(lp, lq, lam):  # log(lam p + (1 - lam) q)
        return torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(lam)),
                                            lq + torch.log(torch.tensor(1 - lam))]), 0)

    def ab(lp, lq, a=0.2, b=0.7):
        k = a + b
        return (-(torch.exp(a * lp + b * lq) - a / k * torch.exp(k * lp) - b / k * torch.exp(k * lq)) / (a * b)).sum(-1)

    def fn(s, t):
        lq, lp = logs(s, t)
        if method == "fkl":
            return kl(lp, lq)
        if method == "rkl":
            return kl(lq, lp)
        if method == "symmetric_kl":
            return 0.1 * kl(lp, lq) + 0.9 * kl(lq, lp)
        if method == "tvd":
            return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
        if method == "gjsd":
            lm = mix(lp, lq, 0.5)
            return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)
        if method == "skl":
            return kl(lp, mix(lp, lq, 0.1))
        if method == "srkl":
            return kl(lq, mix(lp, lq, 0.9))
        if method == "distillm2":
            return kl(lp, mix(lp, lq, 0.1))
        if method == "abkd":
            return ab(lp, lq)
        if method == "taid":
            lr = torch.log_softmax(0.6 * s.detach().float() + 0.4 * t.float(), -1)
            return -(lr.exp() * lq).sum(-1)
        if method == "amid":
            a = 0.25
            lr = torch.logaddexp(torch.log(torch.tensor(0.5)) + a * lp, torch.log(torch.tensor(0.5)) + a * lq) / a
            lr = lr - torch.logsumexp(lr, -1, keepdim=True)
            return ab(lp, lr)
        if method == "akl":
            p, q = lp.exp(), lq.exp().detach()
            sp, order = torch.sort(p, -1, descending=True)
            head = sp.cumsum(-1) <= 0.5
            head[:, 0] = True
            gap = (p - q).abs().gather(-1, order)
            gh, gt = (gap * head).sum(-1), (gap * ~head).sum(-1)
            return (gh * kl(lp, lq) + gt * kl(lq, lp)) / (gh + gt)
        raise ValueError(f"no naive implementation of {method!r}")
    return fn


def _loss_fn(method: str, impl: str):
    if impl in ("eager", "compile"):
        fn = _naive(method)
        if impl == "compile":
            fn = torch.compile(fn)
        return lambda s, t: fn(s, t).mean()
    import kdplug
    loss = kdplug.get(method, backend="compiled" if impl == "compiled" else "torch")
    if method == "distillm2":
        return lambda s, t: loss(s[None], t[None], student_generated=torch.tensor([False]))
    return loss


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(method: str, impl: str, n: int, v: int, dtype: str, backward: bool, repeats: int) -> dict:
    """One measurement, in this process (call it in a fresh one: see ``measure``)."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    teacher = torch.randn(n, v) * 3
    teacher.scatter_add_(1, torch.randint(0, v, (n, 4)), 12 + 12 * torch.rand(n, 4))
    student = (0.8 * teacher + 1.8 * torch.randn(n, v)).to(dt)
    teacher = teacher.to(dt)
    loss_fn = _loss_fn(method, impl)
    base = _rss_kib("VmRSS")

    def once():
        s = student.detach().requires_grad_(backward)
        if backward:
            loss = loss_fn(s, teacher)
            loss.backward()
        else:
            with torch.no_grad():
                loss = loss_fn(s, teacher)
        return float(loss.detach())

    try:
        value = once()  # warm-up (and compilation)
        warm = _rss_kib("VmRSS")
        have_peak = _reset_peak()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    high = _rss_kib("VmHWM")
    peak = (high - base) * 1024 if have_peak else None
    steady = (high - warm) * 1024 if have_peak else None
    return {"median_s": statistics.median(times), "times_s": times, "loss": value, "peak_bytes": peak,
            "steady_peak_bytes": steady}


def in_fresh_process(call: str, timeout: float, setup: str = "") -> dict:
    """Evaluate ``call`` (an expression returning a JSON-able dict) in a fresh Python process, so
    that its peak memory is its own and an out-of-memory kill takes only it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4194304", PYTHONWARNINGS="ignore")
    code = f"import json; {setup}; print('RESULT', json.dumps({call}))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {out.returncode} ({'killed: out of memory?' if out.returncode < 0 else tail[:200]})"}


def measure(method, impl, n, v, dtype, backward, repeats, timeout) -> dict:
    """``run_case`` in a fresh process."""
    return in_fresh_process(f"run_case({method!r}, {impl!r}, {n}, {v}, {dtype!r}, {backward}, {repeats})",
                            timeout, "from kdplug._bench import run_case")


def stream_gbps(seconds: float = 2.0) -> float:
    """A triad probe (a = b + s·c, 3 arrays of 256 MiB fp32) in GB/s, STREAM counting."""
    n = 1 << 26
    b, c, a = torch.rand(n), torch.rand(n), torch.empty(n)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.add(b, c, alpha=1.5, out=a)
        best = max(best, 3 * 4 * n / (time.perf_counter() - start) / 1e9)
    return best


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import _extension
    info = _extension.build_info()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "simd": info.get("simd", torch.backends.cpu.get_cpu_capability())}


def run(methods, ns, vs, dtypes, impls, modes, repeats=3, timeout=900, out=None, log=print) -> list[dict]:
    from . import _extension
    if "compiled" in impls and not _extension.has_ops():
        log(f"note: skipping 'compiled': {_extension.why_not()}")
        impls = [i for i in impls if i != "compiled"]
    bandwidth = stream_gbps()
    env = machine()
    log(f"# {env['cpu']}, {env['cores']} cores, {env['threads']} threads, torch {env['torch']}; "
        f"triad probe {bandwidth:.1f} GB/s")
    rows = []
    for dtype in dtypes:
        for n in ns:
            for v in vs:
                for method in methods:
                    for backward in [m == "fwd+bwd" for m in modes]:
                        row = {"method": method, "n": n, "v": v, "dtype": dtype,
                               "mode": "fwd+bwd" if backward else "fwd"}
                        for impl in impls:
                            row[impl] = measure(method, impl, n, v, dtype, backward, repeats, timeout)
                        rows.append(row)
                        log(format_row(row, impls, bandwidth))
    bandwidth_after = stream_gbps()
    result = {"machine": env, "bandwidth_gbps": [bandwidth, bandwidth_after], "impls": list(impls), "rows": rows}
    if out:
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(markdown(result))
        log(f"wrote {out}.md and {out}.json")
    return rows


def _bytes(row, factor):
    return factor * row["n"] * row["v"] * torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()


def format_row(row, impls, bandwidth):
    floor = _bytes(row, 3 if row["mode"] == "fwd+bwd" else 2)
    cells = []
    for impl in impls:
        r = row[impl]
        cells.append(f"{impl}: " + (r["error"] if "error" in r else
                                    f"{r['median_s'] * 1e3:.0f} ms ({floor / r['median_s'] / 1e9:.1f} GB/s)"))
    return f"{row['method']:13s} {row['dtype']:8s} N={row['n']:<5d} V={row['v']:<6d} {row['mode']:7s} " + " | ".join(cells)


def markdown(result) -> str:
    env, impls = result["machine"], result["impls"]
    bw = result["bandwidth_gbps"]
    lines = [f"# kdplug benchmark: {env['cpu']}, {env['cores']} cores",
             "",
             f"torch {env['torch']}, {env['threads']} threads, SIMD {env['simd']}; triad probe "
             f"{bw[0]:.1f} GB/s before, {bw[1]:.1f} GB/s after. Median of repeated runs after a warm-up; "
             "each case in a fresh process. `GB/s` is the effective bandwidth against the physical minimum "
             "(3·N·V·bytes for fwd+bwd, 2·N·V·bytes for fwd); `% floor` divides it by the probe; `mem` is "
             "the peak resident memory above the inputs in N×V tensors of the input dtype (including what "
             "the warm-up call left resident: code pages, allocator caches), `steady` the peak above the "
             "resident size after the warm-up (a call's own temporaries; kdplug's CPU ops keep the last freed "
             "gradient buffer mapped for the next call, so their N×V shows in `mem`, not in `steady`). The last columns "
             "are the speedups of kdplug's compiled core over the others in the same run.",
             ""]
    head = ["method", "dtype", "N", "V", "mode"]
    for impl in impls:
        head += [f"{IMPL_TITLES[impl]} ms", "GB/s", "mem", "steady"]
    if "compiled" in impls:
        head += [f"{IMPL_TITLES['compiled']} % floor"] + [f"vs {IMPL_TITLES[i]}" for i in impls if i != "compiled"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        floor = _bytes(row, 3 if row["mode"] == "fwd+bwd" else 2)
        unit = _bytes(row, 1)
        cells = [row["method"], row["dtype"], str(row["n"]), str(row["v"]), row["mode"]]
        for impl in impls:
            r = row[impl]
            if "error" in r:
                cells += [r["error"].split(":")[0], "", "", ""]
                continue
            mem, steady = ("" if r.get(key) is None else f"{r[key] / unit:.2f}"
                           for key in ("peak_bytes", "steady_peak_bytes"))
            cells += [f"{r['median_s'] * 1e3:.0f}", f"{floor / r['median_s'] / 1e9:.1f}", mem, steady]
        if "compiled" in impls:
            c = row["compiled"]
            ok = "error" not in c
            cells.append(f"{floor / c['median_s'] / 1e9 / bw[0] * 100:.0f}%" if ok else "")
            for impl in impls:
                if impl == "compiled":
                    continue
                r = row[impl]
                cells.append(f"{r['median_s'] / c['median_s']:.1f}×" if ok and "error" not in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
