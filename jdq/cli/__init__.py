"""The ``jdq`` command line: one module per sub-command (``jdq/cli/<name>.py``).

Each sub-command module defines ``add_parser(subparsers)`` and ``run(args) -> int``;
:data:`jdq.cli._common.COMMANDS` lists them in the order ``jdq --help`` shows them. A
sub-command's module is imported only when that command runs (``jdq --help`` lists the others
with their one-line help), so ``jdq sample`` never pays for the cost model and vice versa.
A :class:`CliError` raised by ``run`` prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jdq.cli._common import ASSETS, COMMANDS, DEFAULT_CLASSIFIER, DEFAULT_MODEL, CliError

__all__ = ["ASSETS", "COMMANDS", "DEFAULT_CLASSIFIER", "DEFAULT_MODEL", "CliError", "build_parser", "main"]



def command_module(name: str):
    """The module implementing sub-command ``name``."""
    return importlib.import_module(f"jdq.cli.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``jdq`` parser; only ``command``'s module is imported (the others are listed by name and help)."""
    parser = argparse.ArgumentParser(prog="jdq", description="Quantization of diffusion transformers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        if name == command:
            module = command_module(name)
            module.add_parser(sub).set_defaults(run=module.run)
        else:  # a stand-in, so `jdq --help` lists it without importing it
            sub.add_parser(name, help=help_, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``jdq`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CliError as e:
        print(f"jdq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jdq {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
