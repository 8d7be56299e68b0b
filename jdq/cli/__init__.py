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
import os
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
    """Entry point of the ``jdq`` console script; returns the exit status.

    Ctrl-C prints one line and exits with status 130. Called as the console script (``argv`` is
    None) it then leaves through ``os._exit``. Why: the KeyboardInterrupt usually arrives while XLA's
    worker threads still run a computation the main thread dispatched asynchronously (a sampling
    step). A normal exit then finalizes the interpreter and destroys jaxlib's client under those
    threads: with faulthandler on, the crash report shows no Python frame at all, only native
    teardown, and it happened in 3 of 8 interrupted runs (another died of SIGINT during teardown).
    Every file jdq writes is written atomically (temporary name, then rename) and the temporary
    files are removed as the exception unwinds, before this point, so skipping the teardown loses
    nothing; stdout and stderr are flushed first. Called with an explicit ``argv`` (tests, other
    Python code) it returns 130 instead.
    """
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CliError as e:
        print(f"jdq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = "finished shards are kept" if args.command == "eval" else "nothing was written"
        print(f"jdq {args.command}: interrupted; {what}", file=sys.stderr)
        if console:
            _exit_now(130)
        return 130


def _exit_now(status: int):
    """Flush the standard streams and end the process without the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
