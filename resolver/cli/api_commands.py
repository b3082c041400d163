"""The `bns` commands that run a node through its admin API: site, group, device, pause, unpause, why, and
lists push / versions / rollback / sources / source-add / source-remove / build. Each is a few HTTP calls
(urllib: nothing to install).

The API is `--api URL` or $BNS_API (default http://127.0.0.1:5380), the token `--token` or $BNS_TOKEN.
Output is a table (or `key: value` lines) for people and JSON with `--json`. Exit codes: 0 done, 1 the API
could not be reached or failed (a write: nothing was written), 2 refused (a field at fault, too large), 3 not
found, 4 not allowed (no token, a wrong one, or a read-only token writing), 5 a write whose outcome is
unknown (sent, but the store could not confirm it: read it back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_FAILURE, EXIT_REFUSED, EXIT_NOT_FOUND, EXIT_DENIED, EXIT_UNKNOWN = 1, 2, 3, 4, 5
DEFAULT_API = "http://127.0.0.1:5380"
_UPLOAD_CHUNK = 1 << 20
_POLL = 0.25


class ApiFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return EXIT_DENIED
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 504:
        return EXIT_UNKNOWN
    if 400 <= status < 500:
        return EXIT_REFUSED
    return EXIT_FAILURE


class ApiClient:
    def __init__(self, base: str, token: str | None, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, data: Any = None, size: int | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
            if size is not None:
                headers["Content-Length"] = str(size)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
                message = f"{error['field']}: {error['message']}" if error.get("field") else error["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ApiFailure(_exit_code(exc.code), f"{exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiFailure(EXIT_FAILURE, f"cannot reach the admin API at {self.base}: {reason}") from None
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload.decode()


def _progress(path: Path, show: bool) -> Iterator[bytes]:
    """The file in chunks, with a progress bar on stderr when it is a terminal."""
    total = path.stat().st_size
    sent = 0
    with path.open("rb") as source:
        while chunk := source.read(_UPLOAD_CHUNK):
            sent += len(chunk)
            if show:
                filled = int(30 * sent / total) if total else 30
                print(
                    f"\rupload [{'#' * filled}{'.' * (30 - filled)}] {sent / 2**20:.1f}/{total / 2**20:.1f} MB",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            yield chunk
    if show:
        print(file=sys.stderr)


def _upload(client: ApiClient, path_on_api: str, file: Path, args: argparse.Namespace) -> Any:
    return client.call(
        "POST", path_on_api, data=_progress(file, sys.stderr.isatty() and not args.json), size=file.stat().st_size
    )


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, sort_keys=True))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        columns = list(value[0])
        rows = [[_cell(row.get(column)) for column in columns] for row in value]
        widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
        print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)))
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    elif isinstance(value, list):
        for item in value:
            print(_cell(item))
    elif isinstance(value, dict):
        width = max((len(key) for key in value), default=0)
        for key, item in value.items():
            print(f"{key.ljust(width)}  {_cell(item)}")
    else:
        print(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _site_summary(document: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": document["id"],
        "mode": document.get("mode"),
        "timezone": document.get("timezone"),
        "networks": document.get("networks"),
        "paused_until": document.get("paused_until"),
        "policy": document.get("policy"),
        "groups": sorted(document.get("groups", {})),
        "devices": [
            f"{device_id} ({','.join(entry.get('macs', [])) or '-'}; group {entry.get('group') or '-'})"
            for device_id, entry in sorted(document.get("devices", {}).items())
        ],
        "version": document.get("version"),
    }


def _policy_body(args: argparse.Namespace) -> Any:
    if args.policy_file is not None:
        return json.loads(Path(args.policy_file).read_text())
    return json.loads(args.policy)


def _target_path(args: argparse.Namespace) -> str:
    path = f"/v1/sites/{args.site}"
    if getattr(args, "device", None):  # first: `device set --group` names the device's group, not a target
        return f"{path}/devices/{args.device}"
    if getattr(args, "group", None):
        return f"{path}/groups/{args.group}"
    return path


def _fields(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    fields = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value or None if name in ("group", "default_group") else value
    return fields


def run(args: argparse.Namespace) -> int:
    client = ApiClient(args.api, args.token)
    try:
        result = args.call(client, args)
    except ApiFailure as exc:
        print(f"bns: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, ValueError) as exc:
        print(f"bns: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    _print(result, args.json)
    return 0


# --- what each command calls ---------------------------------------------------------------------------------


def _site_show(client: ApiClient, args: argparse.Namespace) -> Any:
    if args.site is None:
        return client.call("GET", "/v1/sites")
    document = client.call("GET", f"/v1/sites/{args.site}")
    return document if args.json else _site_summary(document)


def _site_set(client: ApiClient, args: argparse.Namespace) -> Any:
    fields = _fields(args, ("name", "networks", "cpe_ids", "timezone", "mode", "default_group"))
    try:
        document = client.call("PATCH", f"/v1/sites/{args.site}", fields)
    except ApiFailure as exc:
        if exc.code != EXIT_NOT_FOUND:
            raise
        document = client.call("PUT", f"/v1/sites/{args.site}", fields)
    return document if args.json else _site_summary(document)


def _delete(client: ApiClient, args: argparse.Namespace) -> Any:
    return client.call("DELETE", _target_path(args))


def _group_set(client: ApiClient, args: argparse.Namespace) -> Any:
    document = client.call("PUT", _target_path(args), _fields(args, ("name",)))
    return document if args.json else _site_summary(document)


def _device_set(client: ApiClient, args: argparse.Namespace) -> Any:
    document = client.call(
        "PUT", _target_path(args), _fields(args, ("name", "macs", "client_ids", "addresses", "group"))
    )
    return document if args.json else _site_summary(document)


def _policy_set(client: ApiClient, args: argparse.Namespace) -> Any:
    if args.clear:
        document = client.call("DELETE", _target_path(args) + "/policy")
    else:
        document = client.call("PUT", _target_path(args) + "/policy", _policy_body(args))
    return document if args.json else _site_summary(document)


def _pause(client: ApiClient, args: argparse.Namespace) -> Any:
    body = {"minutes": args.minutes} if args.minutes is not None else {"until": args.until or "forever"}
    document = client.call("POST", _target_path(args) + "/pause", body)
    return document if args.json else _site_summary(document)


def _unpause(client: ApiClient, args: argparse.Namespace) -> Any:
    document = client.call("POST", _target_path(args) + "/unpause", {})
    return document if args.json else _site_summary(document)


def _why(client: ApiClient, args: argparse.Namespace) -> Any:
    body = {
        key: value
        for key, value in (
            ("name", args.name),
            ("address", args.address),
            ("mac", args.mac),
            ("client_id", args.client_id),
            ("cpe_id", args.cpe_id),
            ("at", args.at),
        )
        if value is not None
    }
    return client.call("POST", "/v1/why", body)


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
    show = sys.stderr.isatty() and not args.json
    while job["state"] == "running":
        if show:
            print(f"\rcompile: {job['stage']} {job['count']:,}\033[K", end="", file=sys.stderr, flush=True)
        time.sleep(_POLL)
        job = client.call("GET", f"/v1/lists/compile/{job['id']}")
    if show:
        print("\r\033[K", end="", file=sys.stderr)
    if job["state"] == "failed":
        raise ApiFailure(EXIT_REFUSED, f"compile failed: {job['error']}")
    return job


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


# --- the parsers ---------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, call: Any) -> None:
    parser.add_argument(
        "--api",
        default=os.environ.get("BNS_API", DEFAULT_API),
        help=f"the admin API (default $BNS_API or {DEFAULT_API})",
    )
    parser.add_argument("--token", default=os.environ.get("BNS_TOKEN"), help="bearer token (default $BNS_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(run=run, call=call)


def _policy_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", metavar="JSON", help="the policy as JSON (see README, Policies)")
    source.add_argument("--policy-file", metavar="FILE", help="a file holding the policy JSON")
    source.add_argument("--clear", action="store_true", help="remove the policy")


def add_commands(commands: argparse._SubParsersAction) -> None:
    site = commands.add_parser("site", help="sites (subscribers) through the admin API").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    show = site.add_parser("show", help="a site, or every site id")
    show.add_argument("site", nargs="?")
    _common(show, _site_show)
    change = site.add_parser("set", help="create a site or change its own fields")
    change.add_argument("site")
    change.add_argument("--name")
    change.add_argument("--network", dest="networks", action="append", metavar="CIDR")
    change.add_argument("--cpe-id", dest="cpe_ids", action="append", metavar="ID")
    change.add_argument("--timezone", metavar="ZONE")
    change.add_argument("--mode", choices=("network", "device"))
    change.add_argument("--default-group", metavar="GROUP")
    _common(change, _site_set)
    policy = site.add_parser("policy", help="set or clear the site-wide policy")
    policy.add_argument("site")
    _policy_source(policy)
    _common(policy, _policy_set)
    delete = site.add_parser("delete", help="delete a site")
    delete.add_argument("site")
    _common(delete, _delete)

    for kind, setter, extra in (("group", _group_set, ()), ("device", _device_set, ("mac", "client-id", "address"))):
        entity = commands.add_parser(kind, help=f"{kind}s of a site through the admin API").add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )
        change = entity.add_parser("set", help=f"create or change a {kind}")
        change.add_argument("site")
        change.add_argument(kind)
        change.add_argument("--name")
        for option in extra:
            change.add_argument(f"--{option}", dest=option.replace("-", "_") + "s", action="append")
        if kind == "device":
            change.add_argument("--group", help="the device's group ('' for none)")
        _common(change, setter)
        policy = entity.add_parser("policy", help=f"set or clear a {kind}'s policy")
        policy.add_argument("site")
        policy.add_argument(kind)
        _policy_source(policy)
        _common(policy, _policy_set)
        delete = entity.add_parser("delete", help=f"delete a {kind}")
        delete.add_argument("site")
        delete.add_argument(kind)
        _common(delete, _delete)

    for name, call in (("pause", _pause), ("unpause", _unpause)):
        parser = commands.add_parser(name, help=f"{name} a site, a group or a device through the admin API")
        parser.add_argument("site")
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--group")
        target.add_argument("--device")
        if name == "pause":
            until = parser.add_mutually_exclusive_group()
            until.add_argument("--minutes", type=float, help="for this many minutes")
            until.add_argument("--until", help="until this RFC 3339 time (default: until unpaused)")
        _common(parser, call)

    why = commands.add_parser("why", help="why a name is or is not blocked for a client")
    why.add_argument("name")
    why.add_argument("--address", required=True, help="the client's address (or its ECS address)")
    why.add_argument("--mac")
    why.add_argument("--client-id")
    why.add_argument("--cpe-id")
    why.add_argument("--at", help="an RFC 3339 time (default: now)")
    _common(why, _why)


def add_list_commands(actions: argparse._SubParsersAction) -> None:
    """`bns lists push | versions | rollback`, beside the local `compile` and `show`."""
    push = actions.add_parser("push", help="publish a compiled artifact to every node (admin API)")
    push.add_argument("artifact")
    _common(push, _push)
    versions = actions.add_parser("versions", help="published versions and the current one (admin API)")
    _common(versions, _versions)
    rollback = actions.add_parser("rollback", help="make an earlier published version current (admin API)")
    rollback.add_argument("version")
    _common(rollback, _rollback)
    sources = actions.add_parser("sources", help="the list sources kept by the admin API")
    _common(sources, _sources)
    add = actions.add_parser("source-add", help="add a list source to a category (admin API)")
    add.add_argument("category")
    add.add_argument("file", help="a list file to upload (any format, gzip or not)")
    add.add_argument(
        "--on-server",
        action="store_true",
        help="FILE is a path on the server (under its admin.source_roots), read at every build",
    )
    _common(add, _source_add)
    remove = actions.add_parser("source-remove", help="remove a list source (admin API)")
    remove.add_argument("category")
    remove.add_argument("source", help="the source's id (`bns lists sources`)")
    _common(remove, _source_remove)
    build = actions.add_parser("build", help="compile the API's sources on the server, with progress (admin API)")
    build.add_argument("--publish", action="store_true", help="publish the result to every node")
    _common(build, _build)
