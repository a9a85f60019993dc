"""The ``kdplug`` command line (also ``python -m kdplug``).

Each subcommand is a module ``kdplug/_cmd_<name>.py`` that defines

- a module docstring: its first line is the command's one-line help in ``kdplug --help``, the
  whole docstring its description in ``kdplug <name> --help``;
- ``add_arguments(parser)``: adds the command's options to its ``argparse`` subparser;
- ``run(args) -> int``: does the work and returns the exit status.

Adding a command is one line in :data:`COMMANDS` plus its module. Modules are imported when the
parser is built, so they should keep heavy imports inside ``run``.

Exit status: 0 success, 1 an error reported by kdplug (a bad plugin, a failed check), 2 a
usage error (argparse names the bad flag or value and what it accepts).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import pluggy

# name -> module implementing it (see the module docstring for what a command module defines)
COMMANDS = {
    "list": "kdplug._cmd_list",
    "info": "kdplug._cmd_info",
    "bench": "kdplug._cmd_bench",
    "toy": "kdplug._cmd_toy",
    "distill": "kdplug._cmd_distill",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kdplug",
        description="Knowledge-distillation losses for language models, as plugins.",
        epilog="Run 'kdplug <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"kdplug {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = commands.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `kdplug list | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, RuntimeError, OSError, pluggy.PluginValidationError) as exc:
        # What kdplug raises for a misconfigured environment (a duplicate method name, a plugin
        # with a misspelled hook, a --data file that is not there, ...) already says what to fix:
        # print it without a traceback.
        print(f"kdplug {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
