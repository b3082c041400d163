"""The `bns` command line. Exit codes: 0 success, 1 failure while running (a store that cannot be reached
included; a write then did not happen), 2 bad usage, configuration or input (a refused write), 3 not found,
5 a write whose outcome is unknown."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from blocklists.artifact import open_artifact
from blocklists.catalog import Catalog, load_catalog
from blocklists.compiler import CompileReport, Source, compile_lists, sources_from_dir
from blocklists.errors import BlocklistError
from blocklists.formats import FORMATS
from blocklists.matcher import Matcher
from resolver import __version__
from resolver.cli.api_commands import add_commands, add_list_commands
from resolver.shared.config import Config, describe_settings, load_config
from resolver.shared.errors import BnsError, ConfigError, StartupError, WriteUnknown
from resolver.shared.policy.model import PolicyError, Site
from resolver.shared.policy.service import NotFound, PolicyService, Target, describe
from resolver.shared.store.backends import open_backends
from resolver.supervisor.process import serve

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNKNOWN = 5


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
        "With --check FILE, validate a file and exit.",
    )
    config.add_argument("--check", type=Path, metavar="FILE", help="validate this TOML file")
    config.set_defaults(run=_run_config)


def _add_lists(commands: argparse._SubParsersAction) -> None:
    lists = commands.add_parser("lists", help="compile and inspect category blocklists")
    actions = lists.add_subparsers(dest="action", required=True, metavar="ACTION")
    compile_ = actions.add_parser(
        "compile",
        help="compile list sources into one artifact",
        description="Compile category list sources (plain, hosts, adblock, RPZ, BIND, dnsmasq, unbound, "
        "wildcard; gzip or not) into one artifact for `bns serve --lists`.",
    )
    compile_.add_argument("--out", type=Path, required=True, help="artifact to write (atomically)")
    compile_.add_argument("--catalog", type=Path, help="category catalogue (default: the packaged one)")
    compile_.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="CATEGORY=PATH",
        help="a list for a category (repeatable); CATEGORY=FORMAT:PATH forces the format",
    )
    compile_.add_argument(
        "--source-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a directory of <category>.txt[.gz] files (repeatable)",
    )
    compile_.add_argument(
        "--tsv",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="domain<TAB>category[,category…] lines (repeatable)",
    )
    compile_.add_argument(
        "--skip-unknown", action="store_true", help="skip categories the catalogue does not have instead of failing"
    )
    compile_.set_defaults(run=_run_lists_compile)
    show = actions.add_parser("show", help="verify an artifact and print its header")
    show.add_argument("artifact", type=Path)
    show.add_argument("--match", metavar="NAME", action="append", default=[], help="also look a name up")
    add_list_commands(actions)
    show.set_defaults(run=_run_lists_show)


def _add_policy(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser(
        "policy",
        help="set and show sites, groups, devices, policies and pauses",
        description="Write to the policy store of the config (Redis, or the embedded file). Every write is "
        "validated whole and applied atomically; a running server picks it up within a second.",
    )
    policy.add_argument("--config", type=Path, help="TOML configuration file (its [store] section is used)")
    policy.add_argument("--redis", metavar="URL", help="use this Redis instead of the config's store")
    policy.add_argument("--file", metavar="PATH", help="use this embedded policy file instead")
    actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")

    site = actions.add_parser("site", help="create or change a site (subscriber)")
    site.add_argument("site")
    site.add_argument("--name")
    site.add_argument("--network", action="append", metavar="CIDR", help="a network the site's queries come from")
    site.add_argument("--cpe-id", action="append", metavar="ID", help="a CPE id (EDNS 65074) naming the site")
    site.add_argument("--timezone", metavar="ZONE", help="e.g. Europe/London (schedules use it)")
    site.add_argument("--mode", choices=("network", "device"))
    site.add_argument("--default-group", metavar="GROUP", help="the group of devices the site does not know")
    site.add_argument("--delete", action="store_true", help="delete the site")
    site.set_defaults(run=_run_policy_site)

    group = actions.add_parser("group", help="create or change a group of devices")
    group.add_argument("site")
    group.add_argument("group")
    group.add_argument("--name")
    group.add_argument("--delete", action="store_true")
    group.set_defaults(run=_run_policy_group)

    device = actions.add_parser("device", help="create or change a device")
    device.add_argument("site")
    device.add_argument("device")
    device.add_argument("--name")
    device.add_argument("--mac", action="append", help="a MAC address (EDNS 65001/65073)")
    device.add_argument("--client-id", action="append", help="a client id (Umbrella device id)")
    device.add_argument("--address", action="append", help="an address of the device")
    device.add_argument("--group", help="the device's group ('' for none)")
    device.add_argument("--delete", action="store_true")
    device.set_defaults(run=_run_policy_device)

    for name, helptext in (
        ("set", "set the policy of the site, a group or a device"),
        ("pause", "block everything for the site, a group or a device"),
        ("unpause", "end a pause"),
    ):
        command = actions.add_parser(name, help=helptext)
        command.add_argument("site")
        target = command.add_mutually_exclusive_group()
        target.add_argument("--group")
        target.add_argument("--device")
        if name == "set":
            source = command.add_mutually_exclusive_group(required=True)
            source.add_argument("--json", help="the policy as JSON (see README, Policies)")
            source.add_argument("--policy-file", type=Path, help="a file holding the policy JSON")
            source.add_argument("--clear", action="store_true", help="remove the policy")
        if name == "pause":
            command.add_argument("--until", help="an RFC 3339 time (default: until unpaused)")
            command.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 30m, 2h, 1d")
        command.set_defaults(
            run={"set": _run_policy_set, "pause": _run_policy_pause, "unpause": _run_policy_unpause}[name]
        )

    profile = actions.add_parser("profile", help="set or delete a policy profile (e.g. guest)")
    profile.add_argument("name")
    profile_source = profile.add_mutually_exclusive_group(required=True)
    profile_source.add_argument("--json")
    profile_source.add_argument("--delete", action="store_true")
    profile.set_defaults(run=_run_policy_profile)

    load = actions.add_parser("import", help="create or replace many sites from a file of JSON lines")
    load.add_argument("path", type=Path, help="one site document per line")
    load.set_defaults(run=_run_policy_import)

    show = actions.add_parser("show", help="print a site as JSON, or list every site")
    show.add_argument("site", nargs="?")
    show.set_defaults(run=_run_policy_show)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.workers is not None:
        overrides.setdefault("server", {})["workers"] = args.workers
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
        load_config(args.check)
        print(f"{args.check}: valid")
        return 0
    for key, default, doc in describe_settings():
        print(f"{key:32} {default:40} {doc}")
    return 0


def _parse_source(text: str, catalog: Catalog) -> Source:
    category, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(f"--source {text!r}: expected CATEGORY=PATH")
    if category not in catalog:
        raise ConfigError(
            f"--source {text!r}: {category!r} is not in the catalogue (known: {', '.join(c.id for c in catalog)})"
        )
    source_format, colon, path = rest.partition(":")
    if colon and source_format in FORMATS:
        return Source(Path(path), category, source_format)
    return Source(Path(rest), category)


def _progress_line() -> Callable[[str, int], None] | None:
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(stage: str, count: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            print(f"\r\033[K{stage}: {count:,}", end="", file=sys.stderr, flush=True)

    return show


def _run_lists_compile(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    sources = [_parse_source(text, catalog) for text in args.source]
    for directory in args.source_dir:
        sources += sources_from_dir(directory, catalog, args.skip_unknown)
    sources += [Source(path) for path in args.tsv]
    if not sources:
        raise ConfigError("lists compile: give at least one --source, --source-dir or --tsv")
    progress = _progress_line()
    report = compile_lists(sources, args.out, catalog, skip_unknown=args.skip_unknown, progress=progress)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    print(format_compile_report(report))
    return 0


def _run_lists_show(args: argparse.Namespace) -> int:
    artifact = open_artifact(args.artifact)
    header = artifact.header
    print(
        f"{args.artifact}: version {artifact.version}, built {header['built']}, {artifact.names:,} names, "
        f"{header['allows']:,} allow entries, {header['size']:,} bytes"
    )
    for category, info in header["categories"].items():
        print(f"  {category:20} bit {info['bit']:2}  {info['count']:>10,} names")
    matcher = Matcher(artifact)
    for name in args.match:
        match = matcher.match(name)
        verdict = (
            "allowed by " + str(match.listed)
            if match.allowed
            else (f"{', '.join(load_catalog().ids(match.bits))} via {match.listed}" if match.bits else "not listed")
        )
        print(f"  {name}: {verdict}")
    return 0


def format_compile_report(report: CompileReport) -> str:
    lines = [
        f"wrote {report.out}: {report.names:,} names ({report.allows:,} allow entries), "
        f"{report.size / 1e6:.1f} MB, version {report.version}, in {report.seconds:.1f} s"
    ]
    for category, count in report.per_category.items():
        if count:
            lines.append(f"  {category:20} {count:>10,}")
    for source in report.sources:
        skipped = sum(source.skipped.values())
        lines.append(
            f"  {source.path}: {source.format}, {source.lines:,} lines, {source.entries:,} entries, "
            f"{source.rejected_count:,} rejected, {skipped:,} skipped"
        )
        for number, reason, text in source.samples[:5]:
            lines.append(f"    line {number}: {reason}: {text}")
        if source.rejected_count > 5:
            lines.append(f"    … and {source.rejected_count - 5:,} more rejected lines")
    return "\n".join(lines)


def _policy_service(args: argparse.Namespace) -> PolicyService:
    config = load_config(args.config)
    catalog = load_catalog(Path(config.lists.catalog) if config.lists.catalog else None)
    redis_url = args.redis if args.redis is not None else ("" if args.file else config.store.redis)
    settings = dataclasses.replace(config.store, redis=redis_url, file=args.file or config.store.file)
    store = open_backends(dataclasses.replace(config, store=settings), catalog).policies
    if store is None:
        raise ConfigError("store: no Redis and no embedded file configured; set store.redis or store.file")
    return PolicyService(store)


def _with_service(args: argparse.Namespace, work: Callable[[PolicyService], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        service = _policy_service(args)
        try:
            return await work(service)
        finally:
            await service.store.close()

    return asyncio.run(run())


def _target(args: argparse.Namespace) -> Target:
    if args.group:
        return ("group", args.group)
    if args.device:
        return ("device", args.device)
    return ("site", None)


def _print_site(site: Site | None) -> int:
    if site is not None:
        print(json.dumps(describe(site), indent=2))
    return 0


def _run_policy_site(args: argparse.Namespace) -> int:
    if args.delete:
        _with_service(args, lambda service: service.delete_site(args.site))
        return 0
    fields = {
        key: value
        for key, value in (
            ("name", args.name),
            ("networks", args.network),
            ("cpe_ids", args.cpe_id),
            ("timezone", args.timezone),
            ("mode", args.mode),
            ("default_group", args.default_group),
        )
        if value is not None
    }
    return _print_site(_with_service(args, lambda service: service.set_site_fields(args.site, fields)))


def _run_policy_group(args: argparse.Namespace) -> int:
    if args.delete:
        return _print_site(_with_service(args, lambda service: service.delete_group(args.site, args.group)))
    fields = {"name": args.name} if args.name is not None else {}
    return _print_site(_with_service(args, lambda service: service.put_group(args.site, args.group, fields)))


def _run_policy_device(args: argparse.Namespace) -> int:
    if args.delete:
        return _print_site(_with_service(args, lambda service: service.delete_device(args.site, args.device)))
    fields = {
        key: value
        for key, value in (
            ("name", args.name),
            ("macs", args.mac),
            ("client_ids", args.client_id),
            ("addresses", args.address),
        )
        if value is not None
    }
    if args.group is not None:
        fields["group"] = args.group or None
    return _print_site(_with_service(args, lambda service: service.put_device(args.site, args.device, fields)))


def _read_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PolicyError(what, f"not valid JSON: {exc}") from None


def _run_policy_set(args: argparse.Namespace) -> int:
    policy = None
    if args.json is not None:
        policy = _read_json(args.json, "--json")
    elif args.policy_file is not None:
        policy = _read_json(args.policy_file.read_text(), str(args.policy_file))
    return _print_site(_with_service(args, lambda service: service.set_policy(args.site, _target(args), policy)))


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _run_policy_pause(args: argparse.Namespace) -> int:
    until: str | float = args.until or "forever"
    if args.duration:
        unit = args.duration[-1:]
        if unit not in _DURATION or not args.duration[:-1].isdigit():
            raise ConfigError(f"--for {args.duration!r}: expected a number and s, m, h or d (e.g. 30m)")
        until = time.time() + int(args.duration[:-1]) * _DURATION[unit]
    return _print_site(_with_service(args, lambda service: service.pause(args.site, _target(args), until)))


def _run_policy_unpause(args: argparse.Namespace) -> int:
    return _print_site(_with_service(args, lambda service: service.unpause(args.site, _target(args))))


def _run_policy_profile(args: argparse.Namespace) -> int:
    policy = None if args.delete else _read_json(args.json, "--json")
    _with_service(args, lambda service: service.set_profile(args.name, policy))
    return 0


def _run_policy_import(args: argparse.Namespace) -> int:
    documents = [
        _read_json(line, f"{args.path}:{number}")
        for number, line in enumerate(args.path.read_text().splitlines(), 1)
        if line.strip()
    ]
    count = _with_service(args, lambda service: service.store.import_sites(documents))
    print(f"imported {count} sites")
    return 0


def _run_policy_show(args: argparse.Namespace) -> int:
    if args.site is None:
        for site_id in _with_service(args, lambda service: service.list_sites()):
            print(site_id)
        return 0
    document, version = _with_service(args, lambda service: service.get_site(args.site))
    print(json.dumps({**document, "version": version}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bns", description="A filtering, caching DNS resolver.")
    parser.add_argument("--version", action="version", version=f"bns {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_lists(commands)
    _add_policy(commands)
    add_commands(commands)
    _add_config(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"bns: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PolicyError as exc:
        print(f"bns: refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"bns: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except WriteUnknown as exc:
        print(f"bns: outcome unknown: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except StartupError as exc:
        print(f"bns: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (BnsError, BlocklistError) as exc:
        print(f"bns: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
