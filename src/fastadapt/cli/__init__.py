"""The ``fastadapt`` command line: one module per command (``train``, ``eval``, ``predict``,
``plot``), each registering its own parser. It only wires: every decision is made below it."""

from __future__ import annotations

import sys
import warnings

from ..config import ConfigError
from . import common
from . import eval as eval_command
from . import plot as plot_command
from . import predict as predict_command
from . import train as train_command
from .train import train_config

COMMANDS = (train_command, eval_command, predict_command, plot_command)


def build_parser() -> common.Parser:
    parser = common.Parser(prog="fastadapt", description="Fast gradient-based meta-learning.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
    except SystemExit as done:  # --help, or a malformed command line (already reported in one line)
        return int(done.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    args.flags = common.flags(parser, args.command)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"fastadapt {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.run(args)
        except ConfigError as error:
            if debug:
                raise
            print(f"fastadapt {args.command}: error: {args.flags.get(error.key, error.key)} {error.message}",
                  file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as error:
            if debug:
                raise
            print(f"fastadapt {args.command}: error: {error}", file=sys.stderr)
            return 2


__all__ = ["build_parser", "main", "train_config"]
