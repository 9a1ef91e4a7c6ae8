"""`fedtext` command line: argparse subcommands, one module per command, one line per flag.

The only argparse code in fedtext lives in fedtext/cli/; each module registers its command.
A user mistake raises FedtextError, which is printed here as one line, with exit status 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedtext.errors import FedtextError

# Modules under fedtext/cli that provide register(subparsers), in --help order.
COMMAND_MODULES = ["data", "train", "tutorial", "pretrain", "evaluate", "generate", "plot",
                   "privacy",
                   "keras", "info", "benchmark", "report", "flower"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a usage dump is noise for a mistyped flag)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fedtext import __version__

    parser = _Parser(
        prog="fedtext",
        description="Federated learning of character-level text generators.",
    )
    parser.add_argument("--version", action="version", version=f"fedtext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"fedtext.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for provenance records
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedtextError as e:
        print(f"fedtext: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtext: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
