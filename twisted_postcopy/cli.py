# -*- test-case-name: tests.test_cli -*-
"""
The C{postcopy} command line.

Each subcommand lives in the module that owns its concept; that module
provides C{register(subparsers)}, which adds its parsers and sets a C{func}
default taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: Modules that contribute subcommands, in the order of C{--help}.
SUBCOMMAND_MODULES = (
    "twisted_postcopy.demo",
    "twisted_postcopy.control.cli",
    "twisted_postcopy.snapshot.cli",
    "twisted_postcopy.inspect",
    "twisted_postcopy.observe.watch",
    "twisted_postcopy.observe.plots",
)


def buildParser() -> argparse.ArgumentParser:
    """
    Build the argument parser with every subcommand.

    @return: the parser.
    """
    parser = argparse.ArgumentParser(
        prog="postcopy",
        description="Postcopy live migration, byte-compatible with QEMU 7.2.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # During development a subcommand module may not exist yet.
            if e.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{postcopy} command.

    @param argv: the arguments (default: C{sys.argv[1:]}).
    @return: the exit status.
    """
    args = buildParser().parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
