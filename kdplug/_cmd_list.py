"""List the registered methods and the plugins that provide them.

Methods show their parameters with defaults (what kdplug.get(name, **params) accepts),
aliases, reference and plugin; "[PyTorch only]" marks a method defined by torch_loss alone,
which does not run on the compiled core. Plugins show their distribution, version and methods,
and the error of a plugin that failed to load. KDPLUG_LOAD_PLUGINS=dist1,dist2 limits which
third-party distributions load ('' loads none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap

WIDTH = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help='print {"methods": [...], "plugins": [...]} as JSON')


def run(args: argparse.Namespace) -> int:
    import kdplug

    methods, plugins = kdplug.list_methods(), kdplug.list_plugins()
    if args.json:
        data = {"methods": [dataclasses.asdict(m) for m in methods],
                "plugins": [dataclasses.asdict(p) for p in plugins]}
        json.dump(data, sys.stdout, indent=2, default=repr)
        print()
    else:
        print(format_methods(methods, plugins))
        print()
        print(format_plugins(plugins))
    return 0


def format_methods(methods, plugins) -> str:
    versions = {p.name: p.version for p in plugins}
    lines = [f"Methods ({len(methods)})"]
    for m in methods:
        head = f"{m.name}  {m.summary}".rstrip()
        if not m.compiled:
            head += "  [PyTorch only]"
        lines += ["", *_wrap(head, "", "    ")]
        params = ", ".join(f"{k}={v!r}" for k, v in m.parameters.items()) or "none"
        plugin = m.plugin + (f" ({_dist(m.distribution, versions.get(m.plugin))})"
                             if m.distribution else "")
        fields = [("parameters", params), ("aliases", ", ".join(m.aliases)),
                  ("reference", m.reference), ("plugin", plugin)]
        for label, value in fields:
            if value:
                lines += _wrap(value, f"    {label + ':':<12}", " " * 16)
    return "\n".join(lines)


def format_plugins(plugins) -> str:
    header = ("name", "distribution", "version", "module", "methods")
    rows = [(p.name, p.distribution or "-", p.version or "-", p.module,
             ", ".join(p.methods) or ("FAILED" if p.error else "-")) for p in plugins]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    indent = sum(widths) + 2 * 4
    lines = [f"Plugins ({len(plugins)})", ""]
    for row, plugin in zip([header, *rows], [None, *plugins]):
        prefix = "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  "
        lines += _wrap(row[4], prefix, " " * indent, width=max(WIDTH, indent + 24))
        if plugin is not None and plugin.error:
            lines += _wrap(plugin.error, "    error: ", " " * 11)
    return "\n".join(line.rstrip() for line in lines)


def _dist(name, version) -> str:
    return f"{name} {version}" if version else name


def _wrap(text: str, first: str, rest: str, width: int = WIDTH) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
