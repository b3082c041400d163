"""`bns lists`: compile and inspect artifacts here, and publish, roll back and build them, and keep their
sources, through a node's admin API (`--api URL`, else $BNS_API; `--token`, else $BNS_TOKEN)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blocklists.artifact import open_artifact
from blocklists.catalog import Catalog, load_catalog
from blocklists.compiler import ALLOW, CompileReport, Source, compile_lists, sources_from_dir
from blocklists.formats import FORMATS
from blocklists.matcher import Matcher
from resolver.cli.api_client import ApiClient, ApiFailure
from resolver.cli.flags import add_api, add_output
from resolver.cli.output import show
from resolver.shared.errors import EXIT_REFUSED, ConfigError, Refused

_POLL = 0.25


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_lists(commands)


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
        help="a list for a category, or `allow` for an allowlist (repeatable); CATEGORY=FORMAT:PATH forces the format",
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
    add_output(compile_)
    compile_.set_defaults(run=_run_lists_compile)
    show = actions.add_parser("show", help="verify an artifact and print its header")
    show.add_argument("artifact", type=Path)
    show.add_argument("--match", metavar="NAME", action="append", default=[], help="also look a name up")
    add_output(show)
    show.set_defaults(run=_run_lists_show)
    add_list_commands(actions)


def _parse_source(text: str, catalog: Catalog) -> Source:
    category, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(f"--source {text!r}: expected CATEGORY=PATH")
    if category not in catalog and category != ALLOW:
        raise ConfigError(
            f"--source {text!r}: {category!r} is not in the catalogue "
            f"(known: {', '.join(c.id for c in catalog)}, or {ALLOW} for an allowlist)"
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
    if not args.out.parent.is_dir():
        raise Refused(f"--out {args.out}: {args.out.parent} is not a directory")
    progress = _progress_line()
    report = compile_lists(sources, args.out, catalog, skip_unknown=args.skip_unknown, progress=progress)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        show(dataclasses.asdict(report), as_json=True)
    else:
        print(format_compile_report(report))
    return 0


def _run_lists_show(args: argparse.Namespace) -> int:
    artifact = open_artifact(args.artifact)
    header = artifact.header
    matcher, catalog = Matcher(artifact), load_catalog()
    lookups = []
    for name in args.match:
        match = matcher.match(name)
        lookups.append(
            {"name": name, "allowed": match.allowed, "categories": catalog.ids(match.bits), "via": match.listed}
        )
    if args.json:
        described = {key: header[key] for key in ("built", "allows", "size", "categories")}
        show(
            {
                "artifact": str(args.artifact),
                "version": artifact.version,
                "names": artifact.names,
                **described,
                "matches": lookups,
            },
            as_json=True,
        )
        return 0
    print(
        f"{args.artifact}: version {artifact.version}, built {header['built']}, {artifact.names:,} names, "
        f"{header['allows']:,} allow entries, {header['size']:,} bytes"
    )
    for category, info in header["categories"].items():
        print(f"  {category:20} bit {info['bit']:2}  {info['count']:>10,} names")
    for lookup in lookups:
        verdict = (
            f"allowed by {lookup['via']}"
            if lookup["allowed"]
            else (f"{', '.join(lookup['categories'])} via {lookup['via']}" if lookup["categories"] else "not listed")
        )
        print(f"  {lookup['name']}: {verdict}")
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


# --- through the admin API -----------------------------------------------------------------------------------


def _through_api(args: argparse.Namespace) -> int:
    client = ApiClient(args.api, args.token)
    show(args.call(client, args), args.json)
    return 0


def _upload(client: ApiClient, path_on_api: str, file: Path, args: argparse.Namespace) -> Any:
    return client.upload(path_on_api, file, sys.stderr.isatty() and not args.json)


def _push(client: ApiClient, args: argparse.Namespace) -> Any:
    return _upload(client, "/v1/lists", Path(args.artifact), args)


def _sources(client: ApiClient, args: argparse.Namespace) -> Any:
    found = client.call("GET", "/v1/sources")
    if args.json:
        return found
    return [
        {key: entry[key] for key in ("id", "category", "kind", "name", "format", "entries", "rejected")}
        for entry in found
    ]


def _source_add(client: ApiClient, args: argparse.Namespace) -> Any:
    category = urllib.parse.quote(args.category, safe="")
    if args.on_server:
        return client.call("POST", f"/v1/sources/{category}/path", {"path": args.file})
    file = Path(args.file)
    return _upload(client, f"/v1/sources/{category}?name={urllib.parse.quote(file.name)}", file, args)


def _source_remove(client: ApiClient, args: argparse.Namespace) -> Any:
    category, source = (urllib.parse.quote(part, safe="") for part in (args.category, args.source))
    return client.call("DELETE", f"/v1/sources/{category}/{source}")


def _build(client: ApiClient, args: argparse.Namespace) -> Any:
    """Start a compile on the server and follow it to the end, with its stage on a terminal."""
    job = client.call("POST", "/v1/lists/compile", {"publish": args.publish})
    progress = sys.stderr.isatty() and not args.json
    while job["state"] == "running":
        if progress:
            print(f"\rcompile: {job['stage']} {job['count']:,}\033[K", end="", file=sys.stderr, flush=True)
        time.sleep(_POLL)
        job = client.call("GET", f"/v1/lists/compile/{job['id']}")
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    if job["state"] == "failed":
        raise ApiFailure(f"compile failed: {job['error']}", EXIT_REFUSED)
    return job


def _feed_add(client: ApiClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"url": args.url}
    if args.interval is not None:
        body["interval"] = args.interval
    if args.format is not None:
        body["format"] = args.format
    return client.call("POST", f"/v1/sources/{urllib.parse.quote(args.category, safe='')}/feed", body)


def _feeds(client: ApiClient, args: argparse.Namespace) -> Any:
    found = client.call("GET", "/v1/lists/feeds")
    if args.json:
        return found
    return [
        {
            "id": feed["id"],
            "category": feed["category"],
            "entries": feed["entries"],
            "age": _duration(feed["age"]) + (" STALE" if feed["stale"] else ""),
            "304s": feed["not_modified"],
            "error": feed["error"],
            "url": feed["url"],
        }
        for feed in found
    ]


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _feed_refresh(client: ApiClient, args: argparse.Namespace) -> Any:
    """Ask for a download and wait for it (the lease holder makes it within a third of feeds.check_interval)."""
    source = urllib.parse.quote(args.source, safe="")
    asked = client.call("POST", f"/v1/lists/feeds/{source}/refresh", {"force": args.force})
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(_POLL)
        feed = next((f for f in client.call("GET", "/v1/lists/feeds") if f["id"] == args.source), None)
        if feed is None:
            raise ApiFailure(f"feed {args.source} was removed", EXIT_REFUSED)
        if feed["checked_at"] > asked["checked_at"]:
            if feed["error"] and feed["error_at"] >= feed["checked_at"]:
                raise ApiFailure(f"feed {args.source}: {feed['error']}", EXIT_REFUSED)
            return feed
    raise ApiFailure(f"feed {args.source}: no download within {args.wait:g} s; see `bns lists feed list`", EXIT_REFUSED)


def _versions(client: ApiClient, args: argparse.Namespace) -> Any:
    found = client.call("GET", "/v1/lists")
    if args.json:
        return found
    return [
        {
            "version": v["version"],
            "current": "*" if v["current"] else "",
            "names": v["names"],
            "size": v["size"],
            "published_at": v["published_at"],
        }
        for v in found["versions"]
    ]


def _rollback(client: ApiClient, args: argparse.Namespace) -> Any:
    return client.call("POST", "/v1/lists/rollback", {"version": args.version})


def _through(parser: argparse.ArgumentParser, call: Callable[[ApiClient, argparse.Namespace], Any]) -> None:
    add_api(parser)
    parser.set_defaults(run=_through_api, call=call)


def add_list_commands(actions: argparse._SubParsersAction) -> None:
    """`bns lists push | versions | rollback | build | source …`, beside the local `compile` and `show`."""
    push = actions.add_parser("push", help="publish a compiled artifact to every node (admin API)")
    push.add_argument("artifact")
    _through(push, _push)
    versions = actions.add_parser("versions", help="published versions and the current one (admin API)")
    _through(versions, _versions)
    rollback = actions.add_parser("rollback", help="make an earlier published version current (admin API)")
    rollback.add_argument("version")
    _through(rollback, _rollback)
    build = actions.add_parser("build", help="compile the API's sources on the server, with progress (admin API)")
    build.add_argument("--publish", action="store_true", help="publish the result to every node")
    _through(build, _build)
    source = actions.add_parser("source", help="the list sources the admin API keeps and builds from")
    verbs = source.add_subparsers(dest="verb", required=True, metavar="ACTION")
    _add_source_commands(verbs, "add", "remove", "list")
    _add_feed_commands(actions)


def _add_feed_commands(actions: argparse._SubParsersAction) -> None:
    feed = actions.add_parser("feed", help="lists fetched by URL and kept current by the fleet (admin API)")
    verbs = feed.add_subparsers(dest="verb", required=True, metavar="ACTION")
    adding = verbs.add_parser("add", help="add a feed to a category (or `allow`); it is downloaded now")
    adding.add_argument("category")
    adding.add_argument("url", help="an http or https URL")
    adding.add_argument("--interval", type=float, help="seconds between refreshes (default: feeds.interval)")
    adding.add_argument("--format", choices=FORMATS, help="the list's format (default: detected)")
    _through(adding, _feed_add)
    _through(verbs.add_parser("list", help="every feed's health: age, entries, 304s, last error"), _feeds)
    refreshing = verbs.add_parser("refresh", help="download a feed now and wait for the outcome")
    refreshing.add_argument("source", help="the feed's id (`bns lists feed list`)")
    refreshing.add_argument(
        "--force", action="store_true", help="take the download even if it shrinks the feed past feeds.max_shrink"
    )
    refreshing.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the download")
    _through(refreshing, _feed_refresh)
    removing = verbs.add_parser("remove", help="remove a feed (its names go at the next build)")
    removing.add_argument("category")
    removing.add_argument("source", help="the feed's id")
    _through(removing, _source_remove)


def _add_source_commands(actions: argparse._SubParsersAction, add: str, remove: str, listing: str) -> None:
    """The source commands, by the names given (the old spellings had others)."""
    adding = actions.add_parser(add, help="add a list source to a category (admin API)")
    adding.add_argument("category")
    adding.add_argument("file", help="a list file to upload (any format, gzip or not)")
    adding.add_argument(
        "--on-server",
        action="store_true",
        help="FILE is a path on the server (under its admin.source_roots), read at every build",
    )
    _through(adding, _source_add)
    removing = actions.add_parser(remove, help="remove a list source (admin API)")
    removing.add_argument("category")
    removing.add_argument("source", help="the source's id (`bns lists source list`)")
    _through(removing, _source_remove)
    _through(actions.add_parser(listing, help="the list sources kept by the admin API"), _sources)


# The spellings before `lists source add|remove|list`, kept for one release.
REPLACED: dict[tuple[str, ...], str] = {
    ("lists", "source-add"): "bns lists source add",
    ("lists", "source-remove"): "bns lists source remove",
    ("lists", "sources"): "bns lists source list",
}


def add_replaced_commands(commands: argparse._SubParsersAction) -> None:
    lists = commands.add_parser("lists", help="the old spellings of the list source commands")
    _add_source_commands(lists.add_subparsers(dest="action", required=True), "source-add", "source-remove", "sources")
