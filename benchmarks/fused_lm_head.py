"""Fused lm_head + loss vs materialized logits: peak memory and time, one process per case.

    python benchmarks/fused_lm_head.py --n 4096 --h 1024 --v 128256 --out benchmarks/fused_cpu_h1024

Each case: student hidden [N, H] and lm_head [V, H] (fp32, requiring grad), teacher given as
hidden states [N, H] and its own lm_head [V, H] (no grad), forward + backward of the token-mean
loss. Implementations: ``fused`` (``loss_fn.fused``), ``unfused`` (logits materialized, then the
same kdplug loss), ``eager`` (logits materialized, naive log_softmax/softmax loss). Memory is the
resident high-water mark above the inputs AND the gradients they receive (hidden, weight: both
are produced by every implementation), in units of one N x V fp32 tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def case(impl, method, n, h, v, repeats):
    import kdplug
    from kdplug._bench import _naive

    torch.manual_seed(0)
    hidden = (torch.randn(n, h) / h ** 0.5).requires_grad_()
    weight = torch.randn(v, h).requires_grad_()
    t_hidden = torch.randn(n, h) / h ** 0.5
    t_weight = torch.randn(v, h) * 1.5
    loss_fn = kdplug.get(method)
    naive = _naive(method)

    def once():
        hidden.grad = weight.grad = None
        if impl == "fused":
            loss = loss_fn.fused(hidden, weight, teacher=(t_hidden, t_weight))
        else:
            with torch.no_grad():
                teacher = t_hidden @ t_weight.T
            logits = hidden @ weight.T
            loss = loss_fn(logits, teacher) if impl == "unfused" else naive(logits, teacher).mean()
        loss.backward()
        return float(loss.detach())

    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    value = None
    for _ in range(repeats):
        start = time.perf_counter()
        value = once()
        times.append(time.perf_counter() - start)
    # the gradients every implementation must produce are outputs, not overhead
    peak = _rss("VmHWM") - base - (hidden.numel() + weight.numel()) * 4
    return {"median_s": statistics.median(times), "loss": value, "peak_bytes": peak}


def measure(impl, method, n, h, v, repeats, timeout):
    from kdplug._bench import in_fresh_process
    here = os.path.dirname(os.path.abspath(__file__))
    return in_fresh_process(f"case({impl!r}, {method!r}, {n}, {h}, {v}, {repeats})", timeout,
                            f"import sys; sys.path.insert(0, {here!r}); from fused_lm_head import case")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["fkl"])
    parser.add_argument("--n", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--h", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--v", type=int, default=128256)
    parser.add_argument("--impl", nargs="+", default=["fused", "unfused", "eager"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from kdplug._bench import machine
    env = machine()
    lines = [f"# Fused lm_head: {env['cpu']}, {env['cores']} cores, torch {env['torch']}", "",
             "Forward + backward of the token-mean loss, fp32; student hidden [N, H] and lm_head [V, H] "
             "require grad, the teacher is hidden states + its own lm_head. `mem` = peak resident memory "
             "above the inputs and their gradients, in N×V fp32 tensors (the unfused paths hold the student "
             "logits, the teacher logits and the logits' gradient: ≥ 3). Median of "
             f"{args.repeats} run(s), each case in a fresh process.", "",
             "| method | N | H | V | " + " | ".join(f"{i} s | {i} mem" for i in args.impl) +
             " | fused vs unfused time |", "|" + "---|" * (4 + 2 * len(args.impl) + 1)]
    rows = []
    for method in args.method:
        for n in args.n:
            for h in args.h:
                row = {"method": method, "n": n, "h": h, "v": args.v}
                cells = [method, str(n), str(h), str(args.v)]
                for impl in args.impl:
                    r = measure(impl, method, n, h, args.v, args.repeats, args.timeout)
                    row[impl] = r
                    unit = n * args.v * 4
                    cells += ([r["error"], ""] if "error" in r else
                              [f"{r['median_s']:.2f}", f"{r['peak_bytes'] / unit:.3f}"])
                    print(method, n, h, impl, r, flush=True)
                f, u = row.get("fused", {}), row.get("unfused", {})
                cells.append(f"{f['median_s'] / u['median_s']:.2f}×" if "median_s" in f and "median_s" in u else "")
                lines.append("| " + " | ".join(cells) + " |")
                rows.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({"machine": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
