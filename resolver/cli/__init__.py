"""The `bns` command line: serve a node (server.py), compile and publish lists (lists.py), and change sites,
devices, policies and pauses (sites.py). Every failure is reported here, once: its message on stderr and its
exit code (0 done, 1 failed, 2 refused, 3 not found, 4 not allowed, 5 a write whose outcome is unknown; see
resolver.shared.errors)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blocklists.errors import BlocklistError
from resolver import __version__
from resolver.cli import lists, server, sites
from resolver.shared.errors import EXIT_FAILURE, BnsError, exit_code_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bns", description="A filtering, caching DNS resolver.")
    parser.add_argument("--version", action="version", version=f"bns {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (server, lists, sites):
        module.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (BnsError, BlocklistError) as exc:
        print(f"bns: {exc.explain() if isinstance(exc, BnsError) else exc}", file=sys.stderr)
        return exit_code_of(exc)
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
