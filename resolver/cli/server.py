"""`bns serve` and `bns config`: run a node, and say what its configuration can hold."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from resolver.cli.flags import add_output
from resolver.cli.output import show
from resolver.shared.config import Config, describe_settings, load_config
from resolver.supervisor.process import check, serve


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_serve(commands)
    _add_config(commands)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="run the resolver", description="Run the resolver: a supervisor and one worker per core."
    )
    serve.add_argument("--config", type=Path, help="TOML configuration file (see `bns config`)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR:PORT",
        help="address to answer on over UDP and TCP (repeatable; IPv6 as [::1]:53)",
    )
    serve.add_argument(
        "--upstream", action="append", metavar="ADDR[:PORT]", help="upstream resolver (repeatable; tried in order)"
    )
    serve.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="network whose queries are answered (repeatable; replaces server.allow, whose default is loopback "
        "and the private ranges)",
    )
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes (0: one per core)")
    serve.add_argument("--lists", metavar="FILE", help="compiled list artifact to serve (`bns lists compile`)")
    serve.add_argument(
        "--admin-listen",
        metavar="ADDR:PORT",
        help='address of the admin HTTP API ("" for none; default 127.0.0.1:5380)',
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(run=_run_serve)


def _add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config",
        help="print every setting with its default and meaning",
        description="Print every configuration key, its default and what it does. "
        "With --check FILE, make every check `bns serve` makes before it listens (the file, the cache "
        "directory, the catalogue, the list, the addresses) and exit.",
    )
    config.add_argument(
        "--check", type=Path, metavar="FILE", help="check this TOML file as `bns serve --config FILE` would"
    )
    add_output(config)
    config.set_defaults(run=_run_config)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.workers is not None:
        overrides.setdefault("server", {})["workers"] = args.workers
    if args.allow:
        overrides.setdefault("server", {})["allow"] = args.allow
    if args.upstream:
        overrides.setdefault("upstream", {})["servers"] = args.upstream
    if args.lists:
        overrides.setdefault("lists", {})["path"] = args.lists
    if args.log_level:
        overrides.setdefault("log", {})["level"] = args.log_level
    if getattr(args, "admin_listen", None) is not None:
        overrides.setdefault("admin", {})["listen"] = args.admin_listen
    return overrides


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)s bns[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, _overrides(args))
    _setup_logging(config)
    return serve(config, lambda: load_config(args.config, _overrides(args)))


def _run_config(args: argparse.Namespace) -> int:
    if args.check is not None:
        lists = check(load_config(args.check))
        described = {"file": str(args.check), "valid": True, "lists": lists.describe()}
        show(described if args.json else f"{args.check}: valid; lists: {lists.describe()}", args.json)
        return 0
    if args.json:  # each default as `bns config` prints it (a Python literal)
        settings = describe_settings()
        show([{"key": key, "default": default, "description": doc} for key, default, doc in settings], True)
        return 0
    for key, default, doc in describe_settings():
        print(f"{key:32} {default:40} {doc}")
    return 0
