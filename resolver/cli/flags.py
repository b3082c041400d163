"""The flags many commands share, each defined here once: where a command finds the policies (a node's admin
API, or a store straight), and how it prints."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts: the documents as the API gives them (times as it gives them; people get "
        "ISO 8601 in UTC)",
    )


def add_api(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """`--api` and `--token`, and `--json`: a command that only a node's admin API can answer."""
    where = parser.add_argument_group("the admin API")
    where.add_argument("--api", metavar="URL", help="the admin API (default $BNS_API, else http://127.0.0.1:5380)")
    where.add_argument("--token", help="its bearer token (default $BNS_TOKEN)")
    add_output(parser)
    return where


def add_api_or_store(parser: argparse.ArgumentParser) -> None:
    """`add_api`'s flags, and the store flags that take the command straight to a store instead."""
    where = add_api(parser)
    where.title = "where the policies are (default: the admin API)"
    where.add_argument("--config", type=Path, metavar="FILE", help="no API: the store of this configuration")
    where.add_argument("--redis", metavar="URL", help="no API: this Redis")
    where.add_argument("--file", metavar="PATH", help="no API: this embedded policy file")


def uses_store(args: argparse.Namespace) -> bool:
    """Whether the command goes straight to a store (a store flag given) rather than through the API."""
    return any(getattr(args, name, None) is not None for name in ("config", "redis", "file"))
