"""The commands about sites, groups, devices, their policies and pauses, profiles, `why`, alerts and activity:
a noun, then a verb (`bns device pause home tablet --for 30m`), whichever way the store is reached.

- Through a running node's admin API (the default): `--api URL` (else $BNS_API, else
  http://127.0.0.1:5380) and `--token TOKEN` (else $BNS_TOKEN).
- Straight to the store of a configuration, for a single box without an API: `--config FILE` (its
  `[store]`), or `--redis URL` / `--file PATH` (flags.py).

Both ways take the same flags, give the same documents and fail the same way (exit codes: see
resolver.shared.errors): a field at fault is exit 2 with its path, a site that does not exist exit 3. The
spellings before this grammar (`bns pause SITE --device D`, `bns policy SITE …`) still work for one release
(`REPLACED`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from resolver.admin.devices import activity_view, identity_fields, site_devices
from resolver.admin.site_tokens import SiteTokens
from resolver.admin.why import Explainer
from resolver.cli.api_client import ApiClient, ApiFailure
from resolver.cli.flags import add_api_or_store, uses_store
from resolver.cli.output import readable, show
from resolver.shared.config import load_config
from resolver.shared.errors import ConfigError, NotFound, Refused
from resolver.shared.loading import load_policy_and_lists
from resolver.shared.policy.model import PolicyError, time_document
from resolver.shared.policy.service import PolicyService, Target, client_id_endpoints, describe
from resolver.shared.store.activity import Activity
from resolver.shared.store.backends import Backends, open_backends

Document = dict[str, Any]
_TOKEN_USAGE = "bns site token SITE [--days N] | bns site token revoke SITE ID"


class Sites(ABC):
    """What the commands do, wherever the policies are. Writes return the site as the write left it."""

    @abstractmethod
    async def sites(self) -> list[str]: ...

    @abstractmethod
    async def site(self, site: str) -> Document: ...

    @abstractmethod
    async def set_site(self, site: str, fields: Document, create: bool = True) -> Document:
        """Change these of the site's own fields; create the site first if it does not exist and `create`."""

    @abstractmethod
    async def delete_site(self, site: str) -> Document: ...

    @abstractmethod
    async def set_member(self, site: str, kind: str, member: str, fields: Document) -> Document:
        """Create or change a group or a device (`kind`) of a site."""

    @abstractmethod
    async def delete_member(self, site: str, kind: str, member: str) -> Document: ...

    @abstractmethod
    async def set_policy(self, site: str, target: Target, policy: Document | None) -> Document:
        """Set the policy of the site, a group or a device; None removes it."""

    @abstractmethod
    async def pause(self, site: str, target: Target, until: float | str) -> Document:
        """Block everything until a time (epoch seconds or RFC 3339), or "forever"."""

    @abstractmethod
    async def unpause(self, site: str, target: Target) -> Document: ...

    @abstractmethod
    async def set_profile(self, name: str, policy: Document | None) -> Document: ...

    @abstractmethod
    async def import_sites(self, documents: list[Document]) -> Document: ...

    @abstractmethod
    async def why(self, question: Document) -> Document: ...

    @abstractmethod
    async def devices(self, site: str) -> list[Document]:
        """Every device of a site seen or configured (admin/devices.py)."""

    @abstractmethod
    async def name_device(self, site: str, key: str, fields: Document) -> Document:
        """Name a seen device or put it in a group: it becomes (or is) a configured device."""

    @abstractmethod
    async def forget_device(self, site: str, key: str) -> Document: ...

    @abstractmethod
    async def renew_client_id(self, site: str, device: str) -> Document:
        """A new random client id for a device, replacing its others (what the API answers)."""

    @abstractmethod
    async def issue_token(self, site: str, days: float | None) -> Document:
        """A site token for the subscriber's app (admin/site_tokens.py), as the API returns it."""

    @abstractmethod
    async def revoke_token(self, site: str, token_id: str) -> Document: ...

    @abstractmethod
    async def alerts(self, site: str) -> list[Document]:
        """The threat alerts of the site's devices, newest first."""

    @abstractmethod
    async def activity(self, site: str, device: str | None, hours: str | None) -> Document:
        """Counts by hour and the top blocked names of the site or one device (admin/devices.py)."""

    async def close(self) -> None:
        return None


class ApiSites(Sites):
    def __init__(self, client: ApiClient) -> None:
        self.client = client

    @staticmethod
    def _path(site: str, target: Target = ("site", None)) -> str:
        path = f"/v1/sites/{urllib.parse.quote(site, safe='')}"
        kind, member = target
        return path if member is None else f"{path}/{kind}s/{urllib.parse.quote(member, safe='')}"

    async def sites(self) -> list[str]:
        return self.client.call("GET", "/v1/sites")

    async def site(self, site: str) -> Document:
        return self.client.call("GET", self._path(site))

    async def set_site(self, site: str, fields: Document, create: bool = True) -> Document:
        try:
            return self.client.call("PATCH", self._path(site), fields)
        except ApiFailure as exc:
            if exc.exit_code != NotFound.exit_code or not create:
                raise
            return self.client.call("PUT", self._path(site), fields)

    async def delete_site(self, site: str) -> Document:
        return self.client.call("DELETE", self._path(site))

    async def set_member(self, site: str, kind: str, member: str, fields: Document) -> Document:
        return self.client.call("PUT", self._path(site, (kind, member)), fields)

    async def delete_member(self, site: str, kind: str, member: str) -> Document:
        return self.client.call("DELETE", self._path(site, (kind, member)))

    async def set_policy(self, site: str, target: Target, policy: Document | None) -> Document:
        path = self._path(site, target) + "/policy"
        if policy is None:
            return self.client.call("DELETE", path)
        return self.client.call("PUT", path, policy)

    async def pause(self, site: str, target: Target, until: float | str) -> Document:
        body = {"until": time_document(until) if isinstance(until, float) else until}
        return self.client.call("POST", self._path(site, target) + "/pause", body)

    async def unpause(self, site: str, target: Target) -> Document:
        return self.client.call("POST", self._path(site, target) + "/unpause", {})

    async def set_profile(self, name: str, policy: Document | None) -> Document:
        path = f"/v1/profiles/{urllib.parse.quote(name, safe='')}"
        if policy is None:
            return self.client.call("DELETE", path)
        return self.client.call("PUT", path, policy)

    async def import_sites(self, documents: list[Document]) -> Document:
        return self.client.call("POST", "/v1/sites", documents)

    async def why(self, question: Document) -> Document:
        return self.client.call("POST", "/v1/why", question)

    async def devices(self, site: str) -> list[Document]:
        return self.client.call("GET", self._path(site) + "/devices")["devices"]

    async def name_device(self, site: str, key: str, fields: Document) -> Document:
        return self.client.call("PATCH", f"{self._path(site)}/devices/seen/{urllib.parse.quote(key, safe=':')}", fields)

    async def forget_device(self, site: str, key: str) -> Document:
        return self.client.call("DELETE", f"{self._path(site)}/devices/seen/{urllib.parse.quote(key, safe=':')}")

    async def renew_client_id(self, site: str, device: str) -> Document:
        return self.client.call("POST", self._path(site, ("device", device)) + "/client-id", {})

    async def issue_token(self, site: str, days: float | None) -> Document:
        return self.client.call("POST", self._path(site) + "/tokens", {} if days is None else {"days": days})

    async def revoke_token(self, site: str, token_id: str) -> Document:
        return self.client.call("DELETE", f"{self._path(site)}/tokens/{urllib.parse.quote(token_id, safe='')}")

    async def alerts(self, site: str) -> list[Document]:
        return self.client.call("GET", self._path(site) + "/alerts")["alerts"]

    async def activity(self, site: str, device: str | None, hours: str | None) -> Document:
        query = urllib.parse.urlencode({key: value for key, value in (("device", device), ("hours", hours)) if value})
        return self.client.call("GET", f"{self._path(site)}/activity?{query}")


class LocalSites(Sites):
    """The store of a configuration, written through the same policy service the API uses."""

    def __init__(self, config_path: Path | None, redis: str | None, file: str | None) -> None:
        store: dict[str, str] = {"file": file} if file else {}
        if redis is not None or file:
            store["redis"] = redis or ""  # --file alone: that file, not the configuration's Redis
        self.config = load_config(config_path, {"store": store})  # validated as the configuration's own
        self.catalog, self.maker, self.lists = load_policy_and_lists(self.config)
        self.backends: Backends = open_backends(self.config, self.catalog)
        if self.backends.policies is None:
            raise ConfigError("store: no Redis and no embedded file configured; set store.redis or store.file")
        self.service = PolicyService(self.backends.policies, self.backends.activity)

    async def sites(self) -> list[str]:
        return await self.service.list_sites()

    async def site(self, site: str) -> Document:
        document, version = await self.service.get_site(site)
        return {**document, "version": version}

    async def set_site(self, site: str, fields: Document, create: bool = True) -> Document:
        return describe(await self.service.set_site_fields(site, fields, create))

    async def delete_site(self, site: str) -> Document:
        await self.service.delete_site(site)
        return {"deleted": site}

    async def set_member(self, site: str, kind: str, member: str, fields: Document) -> Document:
        write = self.service.put_group if kind == "group" else self.service.put_device
        return describe(await write(site, member, fields))

    async def delete_member(self, site: str, kind: str, member: str) -> Document:
        remove = self.service.delete_group if kind == "group" else self.service.delete_device
        return describe(await remove(site, member))

    async def set_policy(self, site: str, target: Target, policy: Document | None) -> Document:
        return describe(await self.service.set_policy(site, target, policy))

    async def pause(self, site: str, target: Target, until: float | str) -> Document:
        return describe(await self.service.pause(site, target, until))

    async def unpause(self, site: str, target: Target) -> Document:
        return describe(await self.service.unpause(site, target))

    async def set_profile(self, name: str, policy: Document | None) -> Document:
        await self.service.set_profile(name, policy)
        return {"profile": name, "deleted": policy is None}

    async def import_sites(self, documents: list[Document]) -> Document:
        return {"imported": await self.service.store.import_sites(documents)}

    async def why(self, question: Document) -> Document:
        return await Explainer(self.service.store, self.maker, self.catalog, self.lists).explain(question)

    def _activity(self) -> Activity:
        if not self.backends.activity.shared:
            raise ConfigError(
                "without Redis, what devices did (seen devices, activity, alerts) is kept by the running node: "
                "ask its API (--api)"
            )
        return self.backends.activity

    async def devices(self, site: str) -> list[Document]:
        activity = self._activity()
        return await site_devices(self.service.store, activity, self.maker, self.catalog, site, time.time())

    async def name_device(self, site: str, key: str, fields: Document) -> Document:
        try:
            identity = identity_fields(key)
        except ValueError as exc:
            raise PolicyError("key", str(exc)) from None
        return describe(await self.service.adopt_device(site, identity, fields))

    async def forget_device(self, site: str, key: str) -> Document:
        await self._activity().forget(site, {key}, time.time())
        return {"forgotten": key}

    async def renew_client_id(self, site: str, device: str) -> Document:
        written, client_id = await self.service.renew_client_id(site, device)
        body = {"site": written.id, "device": device, "client_id": client_id, "version": written.version}
        return {**body, **client_id_endpoints(self.config.tls, client_id)}

    async def issue_token(self, site: str, days: float | None) -> Document:
        raise ConfigError(
            "a site token needs the API (--api): the API that checks it signs it, with its own key (pages.secret, "
            "else the one the fleet shares through Redis, else one made per run)"
        )

    async def revoke_token(self, site: str, token_id: str) -> Document:
        await SiteTokens(self.backends.secret, self.service.store).revoke(site, token_id)
        return {"site": site, "revoked": token_id}

    async def alerts(self, site: str) -> list[Document]:
        return await self._activity().alerts(site)

    async def activity(self, site: str, device: str | None, hours: str | None) -> Document:
        activity = self._activity()
        await self.service.get_site(site)
        return await activity_view(activity, site, device, activity.window(hours, time.time()))

    async def close(self) -> None:
        await self.backends.close()


# --- the commands --------------------------------------------------------------------------------------------

Command = Callable[[Sites, argparse.Namespace], Coroutine[Any, Any, Any]]


def _target(args: argparse.Namespace) -> Target:
    """What a command acts on: the group or device its noun names (`device pause SITE DEVICE`), the one
    `--group` or `--device` names (`policy set`), else the site."""
    if getattr(args, "kind", None) in ("group", "device"):
        return (args.kind, args.member)
    if getattr(args, "target_group", None):
        return ("group", args.target_group)
    if getattr(args, "target_device", None):
        return ("device", args.target_device)
    return ("site", None)


def _summary(document: Document) -> Document:
    return {
        "id": document["id"],
        "mode": document.get("mode"),
        "timezone": document.get("timezone"),
        "networks": document.get("networks"),
        "paused_until": document.get("paused_until"),
        "policy": document.get("policy"),
        "query_log": "on" if document.get("query_log") else "off",
        "groups": sorted(document.get("groups", {})),
        "devices": [
            f"{device_id} ({', '.join(entry.get('macs', [])) or '-'}; group {entry.get('group') or '-'})"
            for device_id, entry in sorted(document.get("devices", {}).items())
        ],
        "version": document.get("version"),
    }


def _json_argument(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PolicyError(what, f"not valid JSON: {exc}") from None


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"{what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _policy(args: argparse.Namespace) -> Document | None:
    if args.policy_file is not None:
        return _json_argument(_read(args.policy_file, "--policy-file"), str(args.policy_file))
    return _json_argument(args.policy, "--policy")


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _until(args: argparse.Namespace) -> float | str:
    if args.duration is None:
        return args.until or "forever"
    unit, number = args.duration[-1:], args.duration[:-1]
    if unit not in _DURATION or not number.isdigit() or int(number) == 0:
        raise Refused(f"--for {args.duration!r}: expected a number above 0 and s, m, h or d (e.g. 30m)")
    return float(int(time.time()) + int(number) * _DURATION[unit])  # to the second: people read it


def _fields(args: argparse.Namespace, names: tuple[str, ...]) -> Document:
    fields = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = (value or None) if name in ("group", "default_group") else value
    return fields


async def _site_show(sites: Sites, args: argparse.Namespace) -> Any:
    if args.site is None:
        return await sites.sites()
    return await sites.site(args.site)


async def _site_set(sites: Sites, args: argparse.Namespace) -> Any:
    fields = _fields(args, ("name", "networks", "cpe_ids", "timezone", "mode", "default_group"))
    return await sites.set_site(args.site, fields)


async def _site_delete(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.delete_site(args.site)


async def _site_import(sites: Sites, args: argparse.Namespace) -> Any:
    lines = _read(args.path, "site import").splitlines()
    documents = [_json_argument(line, f"{args.path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    return await sites.import_sites(documents)


async def _query_log(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.set_site(args.site, {"query_log": args.state == "on"}, create=False)


async def _member_set(sites: Sites, args: argparse.Namespace) -> Any:
    names = ("name",) if args.kind == "group" else ("name", "macs", "client_ids", "addresses", "group")
    return await sites.set_member(args.site, args.kind, args.member, _fields(args, names))


async def _member_delete(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.delete_member(args.site, args.kind, args.member)


async def _policy_set(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.set_policy(args.site, _target(args), None if args.clear else _policy(args))


def _pause_shown(document: Document, args: argparse.Namespace) -> Any:
    """For people, what the pause command did: which site, group or device is paused, and until when."""
    if args.json:
        return document
    kind, member = _target(args)
    entity = document if member is None else document[f"{kind}s"][member]
    shown = {"site": document["id"]} if member is None else {"site": document["id"], kind: member}
    return {**shown, "paused_until": entity.get("paused_until") or "not paused"}


async def _pause(sites: Sites, args: argparse.Namespace) -> Any:
    return _pause_shown(await sites.pause(args.site, _target(args), _until(args)), args)


async def _unpause(sites: Sites, args: argparse.Namespace) -> Any:
    return _pause_shown(await sites.unpause(args.site, _target(args)), args)


async def _profile_set(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.set_profile(args.name, None if args.delete else _policy(args))


async def _devices(sites: Sites, args: argparse.Namespace) -> Any:
    listed = await sites.devices(args.site)
    if args.json:
        return listed
    return [
        {
            "key": device["key"],
            "name": device["name"] or "-",
            "vendor": device["vendor"] or "-",
            "group": device["group"] or "-",
            "status": device["status"],
            "online": "yes" if device["online"] else "no",
            "last seen": readable(device["last_seen"], "last_seen") or "never",
            "queries": device["queries"],
            "blocked": device["blocked"],
        }
        for device in listed
    ]


async def _device_name(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.name_device(args.site, args.key, _fields(args, ("name", "group")))


async def _device_forget(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.forget_device(args.site, args.key)


async def _client_id(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.renew_client_id(args.site, args.member)


async def _site_token(sites: Sites, args: argparse.Namespace) -> Any:
    """`site token SITE`: a token, its id, expiry and the app's sign-in link; `site token revoke SITE ID`."""
    match args.words:
        case ["revoke", site, token_id] if args.days is None:
            return await sites.revoke_token(site, token_id)
        case [site]:
            issued = await sites.issue_token(site, args.days)
        case _:
            raise Refused(f"usage: {_TOKEN_USAGE}")
    if args.json:
        return issued
    app = f"{ApiClient(args.api, None).base}/app/#token={issued['token']}"  # the API the token came from
    return {**issued, "link": app}


async def _why(sites: Sites, args: argparse.Namespace) -> Any:
    question = {
        "name": args.name,
        "address": args.address,
        "mac": args.mac,
        "client_id": args.client_id,
        "cpe_id": args.cpe_id,
        "at": args.at,
        "cnames": args.cnames,
    }
    return await sites.why({key: value for key, value in question.items() if value is not None})


async def _alerts(sites: Sites, args: argparse.Namespace) -> Any:
    found = await sites.alerts(args.site)
    if args.json:
        return found
    return [{key: alert.get(key) for key in ("at", "device", "client", "reason", "name", "detail")} for alert in found]


async def _activity(sites: Sites, args: argparse.Namespace) -> Any:
    return await sites.activity(args.site, args.device, args.hours)


def run(args: argparse.Namespace) -> int:
    async def work() -> Any:
        sites: Sites = (
            LocalSites(args.config, args.redis, args.file)
            if uses_store(args)
            else ApiSites(ApiClient(args.api, args.token))
        )
        try:
            return await args.command(sites, args)
        finally:
            await sites.close()

    result = asyncio.run(work())
    if isinstance(result, dict) and "groups" in result and not args.json:
        result = _summary(result)
    show(result, args.json)
    return 0


# --- the grammar: a noun, then a verb ------------------------------------------------------------------------


def _command(
    actions: argparse._SubParsersAction, name: str, about: str, command: Command, *positionals: str, **defaults: Any
) -> argparse.ArgumentParser:
    """A command that reaches the policies through the API or a store. `positionals`: its arguments, each
    `name` (shown NAME) or `name:SHOWN`."""
    parser = actions.add_parser(name, help=about, description=about[:1].upper() + about[1:] + ".")
    for positional in positionals:
        dest, _, metavar = positional.partition(":")
        parser.add_argument(dest, metavar=metavar or dest.upper())
    add_api_or_store(parser)
    parser.set_defaults(run=run, command=command, **defaults)
    return parser


def _nouns(commands: argparse._SubParsersAction, name: str, about: str) -> argparse._SubParsersAction:
    return commands.add_parser(name, help=about).add_subparsers(dest="action", required=True, metavar="ACTION")


def _pause_options(parser: argparse.ArgumentParser) -> None:
    until = parser.add_mutually_exclusive_group()
    until.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 30m, 2h, 1d")
    until.add_argument("--until", metavar="TIME", help="an RFC 3339 time (default: until unpaused)")


def _policy_source(parser: argparse.ArgumentParser, remove: str | None = None) -> None:
    """--policy or --policy-file (and, in the old spellings, the flag that removed it instead)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", metavar="JSON", help="the policy as JSON (see docs/policies.md)")
    source.add_argument("--policy-file", metavar="FILE", help="a file holding the policy JSON")
    if remove is not None:
        source.add_argument(f"--{remove}", action="store_true", help="remove it")


def _target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--group", dest="target_group", metavar="GROUP", help="a group of the site")
    target.add_argument("--device", dest="target_device", metavar="DEVICE", help="a device of the site")


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_site(commands)
    _add_members(commands)
    policy = _nouns(commands, "policy", "set or clear the policy of a site, a group or a device")
    for verb in ("set", "clear"):
        about = f"{verb} the policy of a site, a group (--group) or a device (--device)"
        parser = _command(policy, verb, about, _policy_set, "site", clear=verb == "clear")
        _target_options(parser)
        if verb == "set":
            _policy_source(parser)
    profile = _nouns(commands, "profile", "policy profiles (e.g. guest) that policies start from")
    _policy_source(_command(profile, "set", "create or change a profile", _profile_set, "name", delete=False))
    _command(profile, "delete", "delete a profile", _profile_set, "name", delete=True)

    why = _command(commands, "why", "why a name is or is not blocked for a client", _why, "name")
    why.add_argument("--address", required=True, help="the client's address (or its ECS address)")
    why.add_argument("--mac")
    why.add_argument("--client-id")
    why.add_argument("--cpe-id")
    why.add_argument("--at", metavar="TIME", help="an RFC 3339 time (default: now)")
    why.add_argument("--cnames", nargs="+", metavar="NAME", help="the CNAME chain an upstream answered with")
    _command(commands, "alerts", "the threat alerts of a site's devices, newest first", _alerts, "site")
    activity = _command(
        commands, "activity", "queries and blocks by hour, and the most blocked names", _activity, "site"
    )
    activity.add_argument("--device", metavar="KEY", help="one device (its key, as `device seen` shows it)")
    activity.add_argument("--hours", metavar="N", help="the last N hours (default: all kept, activity.days)")


def _add_site(commands: argparse._SubParsersAction) -> None:
    site = _nouns(commands, "site", "sites (subscribers)")
    _command(site, "show", "a site, or every site id", _site_show).add_argument("site", nargs="?", metavar="SITE")
    change = _command(site, "set", "create a site or change its own fields", _site_set, "site")
    change.add_argument("--name")
    change.add_argument("--network", dest="networks", action="append", metavar="CIDR")
    change.add_argument("--cpe-id", dest="cpe_ids", action="append", metavar="ID")
    change.add_argument("--timezone", metavar="ZONE", help="e.g. Europe/London (schedules use it)")
    change.add_argument("--mode", choices=("network", "device"))
    change.add_argument("--default-group", metavar="GROUP", help="the group of devices the site does not know")
    _command(site, "delete", "delete a site", _site_delete, "site")
    _command(site, "import", "create or replace many sites from a file of JSON lines", _site_import, "path")
    token = _command(site, "token", "a site token: the subscriber app's sign-in link", _site_token)
    token.usage = _TOKEN_USAGE
    token.add_argument("words", nargs="+", metavar="SITE | revoke SITE ID")
    token.add_argument(
        "--days", type=float, metavar="N", help="how long the token is good for (default 30, at most 366)"
    )
    _pause_options(
        _command(site, "pause", "block everything at the site, for a while or until unpaused", _pause, "site")
    )
    _command(site, "unpause", "end the site's pause", _unpause, "site")
    log = _command(
        site, "query-log", "keep the names the site's devices ask for, or stop (operator)", _query_log, "site"
    )
    log.add_argument("state", choices=("on", "off"))


def _add_members(commands: argparse._SubParsersAction) -> None:
    for kind in ("group", "device"):
        member, which = _nouns(commands, kind, f"{kind}s of a site"), ("site", f"member:{kind.upper()}")
        change = _command(member, "set", f"create or change a {kind}", _member_set, *which, kind=kind)
        change.add_argument("--name")
        if kind == "device":
            change.add_argument("--mac", dest="macs", action="append", help="a MAC address (EDNS 65001/65073)")
            change.add_argument("--client-id", dest="client_ids", action="append", help="a client id")
            change.add_argument("--address", dest="addresses", action="append", help="an address of the device")
            change.add_argument("--group", help="the device's group ('' for none)")
        _command(member, "delete", f"delete a {kind}", _member_delete, *which, kind=kind)
        about = f"block everything for a {kind}, for a while or until unpaused"
        _pause_options(_command(member, "pause", about, _pause, *which, kind=kind))
        _command(member, "unpause", f"end a {kind}'s pause", _unpause, *which, kind=kind)
        if kind == "device":
            _add_seen(member)
            about = (
                "a new random client id for a device, replacing its others: its credential over DoT and DoH "
                "from anywhere (docs/encrypted-dns.md)"
            )
            _command(member, "client-id", about, _client_id, *which)


def _add_seen(device: argparse._SubParsersAction) -> None:
    _command(device, "seen", "every device the site's queries came from, and the configured ones", _devices, "site")
    key = "KEY: a seen device's key as `device seen` shows it (mac:…, id:…, ip:…)"
    name = _command(device, "name", f"name a seen device or put it in a group ({key})", _device_name, "site", "key")
    name.add_argument("--name")
    name.add_argument("--group", help="its group ('' for none)")
    about = f"forget a seen device: its record, activity and logged queries ({key})"
    _command(device, "forget", about, _device_forget, "site", "key")


# --- the spellings before the noun-verb grammar, kept for one release ---------------------------------------

REPLACED: dict[tuple[str, ...], str] = {
    ("pause",): "bns device|group|site pause",
    ("unpause",): "bns device|group|site unpause",
    ("policy",): "bns policy set|clear",
    ("profile",): "bns profile set|delete",
}


def add_replaced_commands(commands: argparse._SubParsersAction) -> None:
    """The old spellings (`REPLACED`), doing what their new ones do."""
    for name, command in (("pause", _pause), ("unpause", _unpause)):
        parser = _command(commands, name, f"{name} a site, a group or a device", command, "site")
        _target_options(parser)
        if name == "pause":
            _pause_options(parser)
    policy = _command(commands, "policy", "set or clear the policy of a site, a group or a device", _policy_set, "site")
    _target_options(policy)
    _policy_source(policy, "clear")
    _policy_source(_command(commands, "profile", "set or delete a policy profile", _profile_set, "name"), "delete")
