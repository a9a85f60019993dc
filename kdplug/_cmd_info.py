"""Show versions, whether the compiled core is available, and the plugin settings.

Useful in bug reports: kdplug, Python, torch and pluggy versions; whether the compiled
extension (kdplug._C) loads and, if not, why; what it was built with; CUDA availability; and
KDPLUG_LOAD_PLUGINS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the information as JSON")


def collect() -> dict:
    """Everything ``kdplug info`` reports, as plain data."""
    import pluggy
    import torch

    import kdplug
    from kdplug import _extension

    cuda = torch.cuda.is_available()
    return {
        "kdplug": {"version": kdplug.__version__, "location": os.path.dirname(kdplug.__file__)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda_version": torch.version.cuda},
        "pluggy": pluggy.__version__,
        "compiled_core": {"available": _extension.has_ops(), "reason": _extension.why_not(),
                          "build_info": _extension.build_info()},
        "cuda": {"available": cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                 if cuda else []},
        "KDPLUG_LOAD_PLUGINS": os.environ.get("KDPLUG_LOAD_PLUGINS"),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=repr)
        print()
        return 0
    core = info["compiled_core"]
    load = info["KDPLUG_LOAD_PLUGINS"]
    rows = [
        ("kdplug", f"{info['kdplug']['version']} ({info['kdplug']['location']})"),
        ("python", f"{info['python']} ({info['platform']})"),
        ("torch", info["torch"]["version"] + (f", CUDA {info['torch']['cuda_version']}"
                                              if info["torch"]["cuda_version"] else ", no CUDA")),
        ("pluggy", info["pluggy"]),
        ("compiled core", "available" if core["available"] else f"not available: {core['reason']}"),
        *((f"  {k}", _text(v)) for k, v in core["build_info"].items()),
        ("CUDA devices", ", ".join(info["cuda"]["devices"]) or "none"),
        ("KDPLUG_LOAD_PLUGINS", "unset (all installed plugins load)" if load is None
         else repr(load) + (" (built-in methods only)" if not load.strip() else "")),
    ]
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        print("\n".join(textwrap.wrap(value, 100, initial_indent=f"{key:<{width}}",
                                       subsequent_indent=" " * width, break_on_hyphens=False)))
    return 0


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)
