"""Time kdplug against naive eager PyTorch and torch.compile of it (forward, forward+backward).

Each case runs in a fresh process; see kdplug/_bench.py for what is measured. The defaults are
the issue's grid (slow: hours on 2 cores); narrow it with --method/--n/--v/--dtype/--impl.
Writes a Markdown table and a JSON file when --out is given.
"""
from . import _bench
from ._cmd_distill import _positive_int


def add_arguments(parser):
    parser.add_argument("--method", nargs="+", default=list(_bench.DEFAULT_METHODS), metavar="NAME",
                        help="methods to time (default: every built-in)")
    parser.add_argument("--n", nargs="+", type=_positive_int, default=[2048, 8192], help="tokens (default: 2048 8192)")
    parser.add_argument("--v", nargs="+", type=_positive_int, default=[32000, 128256, 151936],
                        help="vocabulary sizes (default: 32000 128256 151936)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--impl", nargs="+", default=list(_bench.IMPLS), choices=_bench.IMPLS)
    parser.add_argument("--mode", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    parser.add_argument("--repeats", type=_positive_int, default=3)
    parser.add_argument("--timeout", type=_positive_int, default=900, help="seconds per case (default: 900)")
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args):
    import json

    import kdplug

    known = {m.name for m in kdplug.list_methods()}
    unknown = sorted(set(args.method) - known)
    if unknown:
        raise ValueError(f"--method: unknown {', '.join(unknown)}; available: {', '.join(sorted(known))}")
    rows = _bench.run(args.method, args.n, args.v, args.dtype, args.impl, args.mode, args.repeats,
                      args.timeout, args.out, log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0
