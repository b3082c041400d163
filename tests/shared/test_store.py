"""The policy stores, Redis and the embedded file, held to the same contract."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from blocklists.catalog import load_catalog
from resolver.shared.config import LimitsSettings
from resolver.shared.errors import NotFound
from resolver.shared.policy.model import PolicyError
from resolver.shared.policy.service import PolicyService
from resolver.shared.store.file_policies import FileStore
from resolver.shared.store.policies import Change, Store
from resolver.shared.store.redis_policies import RedisStore
from tests.conftest import redis_policy_store

pytestmark = pytest.mark.integration
CATALOG = load_catalog()


@pytest.fixture(params=["redis", "file"])
def make_store(request, tmp_path, redis_prefix):
    """A factory of stores over the same data (two nodes, or a CLI and a server, share one)."""
    if request.param == "redis":
        redis = request.getfixturevalue("shared_redis")
        return lambda: redis_policy_store(redis.url, redis_prefix)
    path = tmp_path / "policies.json"
    return lambda: FileStore(path, CATALOG, poll_interval=0.02)


def run(coroutine):
    return asyncio.run(coroutine)


async def _with(store: Store, work):
    try:
        return await work(PolicyService(store))
    finally:
        await store.close()


def test_write_read_and_versions(make_store):
    async def work(service):
        site = await service.put_site("a", {"networks": ["192.0.2.0/24"], "mode": "device"})
        assert site.version == 1
        site = await service.put_device("a", "d1", {"macs": ["02:00:00:00:00:01"]})
        assert site.version == 2 and "d1" in site.devices
        document, version = await service.get_site("a")
        assert version == 2 and document["devices"]["d1"]["macs"] == ["02:00:00:00:00:01"]
        assert await service.list_sites() == ["a"]

    run(_with(make_store(), work))


def test_a_refused_write_changes_nothing(make_store):
    async def work(service):
        await service.put_site("a", {"networks": ["192.0.2.0/24"]})
        with pytest.raises(PolicyError, match=r"devices\.d1\.macs\[0\]"):
            await service.put_device("a", "d1", {"macs": ["bad"]})
        with pytest.raises(PolicyError, match=r"groups\.g\.policy\.block"):
            await service.put_group("a", "g", {"policy": {"block": ["nothing-like-it"]}})
        document, version = await service.get_site("a")
        assert version == 1 and document["devices"] == {} and document["groups"] == {}
        with pytest.raises(NotFound):
            await service.put_device("missing", "d1", {})

    run(_with(make_store(), work))


def test_networks_and_cpe_ids_belong_to_one_site(make_store):
    async def work(service):
        await service.put_site("a", {"networks": ["192.0.2.0/24"], "cpe_ids": ["cpe-a"]})
        with pytest.raises(PolicyError, match=r"networks\[0\]: 192\.0\.2\.0/24 already belongs to site a"):
            await service.put_site("b", {"networks": ["192.0.2.0/24"]})
        with pytest.raises(PolicyError, match=r"cpe_ids\[0\]: cpe-a already belongs to site a"):
            await service.put_site("b", {"cpe_ids": ["cpe-a"]})
        assert await service.list_sites() == ["a"]

    run(_with(make_store(), work))


def test_a_client_id_is_found_fleet_wide_and_belongs_to_one_site(make_store):
    """A DoT or DoH client is found by its client id alone: the index names the site with a device of it, follows
    the id when it moves or goes, and refuses a second site the same id, naming the field."""

    async def work(service):
        await service.put_site("a", {"devices": {"phone": {"client_ids": ["id-1", "id-2"]}}})
        await service.put_site("b", {"networks": ["192.0.2.0/24"]})
        store = service.store
        assert await store.locate_client_id("id-2") == ("a", 1)
        assert await store.locate_client_id("nobody") is None
        # whose id it is stays unsaid: a subscriber guessing ids learns nothing
        with pytest.raises(PolicyError, match=r"devices\.tv\.client_ids\[0\]: is another device's client id") as taken:
            await service.put_device("b", "tv", {"client_ids": ["id-1"]})
        assert "site a" not in str(taken.value)
        with pytest.raises(PolicyError, match=r"sites\[0\]\.devices\.tv\.client_ids\[0\]: is another device's"):
            await store.import_sites([{"id": "c", "devices": {"tv": {"client_ids": ["id-2"]}}}])
        _site, renewed = await service.renew_client_id("a", "phone")  # replaces both: they are free again
        assert await store.locate_client_id("id-1") is None and await store.locate_client_id(renewed) == ("a", 2)
        await service.put_device("b", "tv", {"client_ids": ["id-1"]})
        assert await store.locate_client_id("id-1") == ("b", 2)
        await service.delete_site("b")
        assert await store.locate_client_id("id-1") is None

    run(_with(make_store(), work))


def test_client_ids_of_a_site_stored_before_their_index_are_indexed_at_its_next_write(shared_redis, redis_prefix):
    async def work(service):
        await service.put_site("a", {"devices": {"phone": {"client_ids": ["id-1"]}}})
        await service.store.client.delete(service.store.key("clientid"))  # as an older version left it
        assert await service.store.locate_client_id("id-1") is None
        await service.set_site_fields("a", {})  # `bns site set a`, no flags
        assert await service.store.locate_client_id("id-1") == ("a", 2)

    run(_with(redis_policy_store(shared_redis.url, redis_prefix), work))


def test_a_write_of_a_site_with_client_ids_does_not_touch_the_index_others_watch(shared_redis, redis_prefix):
    """Every write WATCHes the indexes (networks, CPE ids, client ids); writing an unchanged entry again breaks
    every other write's WATCH, so a pause storm on one site made writes to every other site retry and fail."""

    async def work(service):
        await service.put_site("a", {"devices": {"phone": {"client_ids": ["id-1"]}}})
        store = service.store
        async with store.client.pipeline(transaction=True) as other:  # another site's write, mid-way
            await other.watch(store.key("clientid"))
            await service.pause("a", ("device", "phone"))
            other.multi()
            other.set(store.key("probe"), "1")
            assert await other.execute() == [True]  # its WATCH held: the index was not written

    run(_with(redis_policy_store(shared_redis.url, redis_prefix), work))


def test_find_site_by_longest_prefix_and_cpe(make_store):
    async def work(service):
        await service.put_site("wide", {"networks": ["10.0.0.0/8", "2001:db8::/32"]})
        await service.put_site("narrow", {"networks": ["10.1.2.0/29"], "cpe_ids": ["cpe-n"]})
        store = service.store
        assert await store.find_site("10.1.2.5", None) == "narrow"
        assert await store.find_site("10.1.2.9", None) == "wide"
        assert await store.find_site("2001:db8::1", None) == "wide"
        assert await store.find_site("192.0.2.1", None) is None
        assert await store.find_site("192.0.2.1", "cpe-n") == "narrow"
        await service.delete_site("narrow")
        assert await store.find_site("10.1.2.5", None) == "wide"
        assert await store.find_site("192.0.2.1", "cpe-n") is None

    run(_with(make_store(), work))


def test_concurrent_writers_lose_nothing(make_store):
    async def work(service):
        await service.put_site("a", {"devices": {f"d{i}": {} for i in range(10)}})
        writers = [make_store() for _ in range(10)]
        try:
            await asyncio.gather(
                *(PolicyService(writer).pause("a", ("device", f"d{i}")) for i, writer in enumerate(writers))
            )
        finally:
            for writer in writers:
                await writer.close()
        document, version = await service.get_site("a")
        assert version == 11
        assert all(device["paused_until"] == "forever" for device in document["devices"].values())

    run(_with(make_store(), work))


async def notices_of(make_store, writes, *awaited: tuple[str, str, int]) -> list[tuple[str, str, int]]:
    """The notices a second store sees while `writes` runs, heard until every one in `awaited` has come."""
    reader = make_store()
    heard: asyncio.Queue[Change] = asyncio.Queue()
    reader.watch(heard.put)
    following = asyncio.ensure_future(reader.connection.listen() if isinstance(reader, RedisStore) else reader.poll())
    try:
        assert (await asyncio.wait_for(heard.get(), 5)).kind == "up"
        await writes()
        seen: list[tuple[str, str, int]] = []
        while not all(notice in seen for notice in awaited):
            change = await asyncio.wait_for(heard.get(), 5)
            seen.append((change.kind, change.key, change.version))
        return seen
    finally:
        following.cancel()
        await reader.close()


def test_changes_are_announced(make_store):
    async def work(service):
        await service.put_site("a", {"networks": ["192.0.2.0/24"]})

        async def writes() -> None:
            await service.put_device("a", "d", {})
            await service.set_site_fields("a", {"networks": ["198.51.100.0/24"]})

        # Redis sends each write's notices; the file store, polling, may fold two writes into one.
        return await notices_of(make_store, writes, ("site", "a", 3), ("networks", "", 0))

    seen = run(_with(make_store(), work))
    assert seen.index(("site", "a", 3)) < seen.index(("networks", "", 0))
    assert all(kind in ("site", "networks") for kind, _, _ in seen)


def test_a_site_deleted_and_made_again_is_announced_as_both(make_store):
    async def work(service):
        await service.put_site("b", {"networks": ["203.0.113.0/24"]})
        await service.put_site("b", {"networks": ["203.0.113.0/24"], "name": "v2"})

        async def writes() -> None:
            await service.delete_site("b")
            await service.put_site("b", {"networks": ["203.0.113.0/24"]})  # versions start over at 1

        return await notices_of(make_store, writes, ("site", "b", 1))

    seen = run(_with(make_store(), work))
    # Whether or not the file store's poll folded the two writes, a holder of version 2 hears of the deletion.
    assert seen.index(("site", "b", 0)) < seen.index(("site", "b", 1))


def test_profiles(make_store):
    async def work(service):
        await service.set_profile("teen", {"block": ["pornography"], "web_protect": True})
        assert set(await service.store.load_profiles()) == {"teen"}
        with pytest.raises(PolicyError, match=r"profiles\.bad\.block"):
            await service.set_profile("bad", {"block": ["nope"]})
        await service.set_profile("teen", None)
        assert await service.store.load_profiles() == {}

    run(_with(make_store(), work))


def test_import_many_sites(make_store):
    documents = [
        {"id": f"s{i}", "networks": [f"10.0.{i}.0/24"], "devices": {"d": {"macs": [f"02:00:00:00:00:{i:02x}"]}}}
        for i in range(50)
    ]

    async def work(service):
        assert await service.store.import_sites(documents) == 50
        assert len(await service.list_sites()) == 50
        assert await service.store.find_site("10.0.7.9", None) == "s7"
        site = await service.store.load_site("s7")
        assert site is not None and site.version == 1 and "d" in site.devices
        with pytest.raises(PolicyError, match=r"10\.0\.3\.0/24"):  # already s3's
            await service.store.import_sites([{"id": "intruder", "networks": ["10.0.3.0/24"]}])
        with pytest.raises(PolicyError, match=r"sites\[1\]\.devices\.x\.macs\[0\]"):
            await service.store.import_sites([{"id": "ok"}, {"id": "bad", "devices": {"x": {"macs": ["?"]}}}])
        assert "intruder" not in await service.list_sites()

    run(_with(make_store(), work))


def test_a_site_keeps_its_incarnation_through_every_write_and_a_site_made_again_gets_another(make_store):
    async def work(service):
        store = service.store
        await service.put_site("a", {"networks": ["192.0.2.0/24"]})
        incarnation, records = await store.site_tokens("a")
        assert len(incarnation) >= 22 and records == {}
        assert await store.change_site_tokens("a", lambda records: {**records, "t1": 4e9}) == incarnation
        await service.set_site_fields("a", {"name": "A"})
        await service.put_site("a", {"networks": ["192.0.2.0/24"], "mode": "device"})  # the whole document
        await store.import_sites([{"id": "a", "name": "imported"}])
        with pytest.raises(PolicyError, match="incarnation: unknown field"):  # no document sets it
            await service.put_site("a", {"incarnation": "chosen-by-a-client"})
        assert await store.site_tokens("a") == (incarnation, {"t1": 4e9})
        await service.delete_site("a")
        assert await store.site_tokens("a") is None
        with pytest.raises(NotFound):
            await store.change_site_tokens("a", lambda records: {**records, "t2": 4e9})
        await store.import_sites([{"id": "a"}])
        made_again, records = await store.site_tokens("a")
        assert made_again not in ("", incarnation) and records == {}

    run(_with(make_store(), work))


LIMITS = LimitsSettings(
    names_per_list=3, devices=2, groups=1, schedules_per_policy=1, passes_per_device=1, document_bytes=4096
)
NAMES = [f"n{i}.example" for i in range(5)]


def test_every_write_stays_within_the_limits_and_a_refused_one_stores_nothing(make_store):
    """The service's writes (the API's and the CLI's) and an import all pass through the store's bounds."""

    async def work(service):
        service.store.limits = LIMITS
        await service.put_site("a", {"networks": ["192.0.2.0/24"], "mode": "device"})
        await service.put_device("a", "tv", {"name": "TV"})
        stored = await service.get_site("a")
        with pytest.raises(
            PolicyError, match=r"^devices\.tv\.policy\.allow: 4 names; at most 3 \(limits\.names_per_list\)$"
        ):
            await service.set_policy("a", ("device", "tv"), {"allow": NAMES[:4]})
        await service.put_device("a", "phone", {})
        with pytest.raises(PolicyError, match=r"^devices: 3 devices; at most 2 \(limits\.devices\)$"):
            await service.put_device("a", "laptop", {})
        with pytest.raises(PolicyError, match=r"^the site's document would be \d+ bytes; at most 4096 "):
            await service.put_device(
                "a", "tv", {"name": "x" * 200, "client_ids": [f"client-{i:02d}-" + "x" * 50 for i in range(70)]}
            )
        document, version = await service.get_site("a")
        assert version == stored[1] + 1 and set(document["devices"]) == {"tv", "phone"}
        with pytest.raises(PolicyError, match=r"^sites\[1\]\.groups: 2 groups; at most 1 \(limits\.groups\)$"):
            await service.store.import_sites([{"id": "b"}, {"id": "c", "groups": {"g": {}, "h": {}}}])
        assert await service.list_sites() == ["a"]

    run(_with(make_store(), work))


def test_a_site_stored_before_incarnations_gets_one_at_its_next_write(make_store):
    async def work(service):
        store = service.store
        await service.put_site("old", {})
        await service.put_site("older", {})
        if isinstance(store, RedisStore):  # as an earlier version stored them
            for site in ("old", "older"):
                await store.client.hdel(store.key("site", site), "incarnation")
        else:
            data = json.loads(store.path.read_text())
            for site in ("old", "older"):
                del data["sites"][site]["incarnation"]
            store.path.write_text(json.dumps(data))
        assert await store.site_tokens("old") == ("", {})  # no token names ""
        await service.pause("old", ("site", None))
        incarnation = (await store.site_tokens("old"))[0]
        assert incarnation and await store.change_site_tokens("old", dict) == incarnation
        assert await store.change_site_tokens("older", dict) == (await store.site_tokens("older"))[0] != ""

    run(_with(make_store(), work))


def test_the_policy_file_and_its_lock_are_readable_by_their_owner_only(tmp_path):
    """Issue 18: the embedded store, which holds webhook secrets, and its lock were written 0644. Every file
    bns makes is 0600, and an older file with wider permissions becomes 0600 at the next write."""
    path, lock = tmp_path / "policies.json", tmp_path / "policies.json.lock"
    webhook = {"url": "https://hooks.example/bns", "secret": "a-secret-of-16-chars"}

    async def work(service: PolicyService) -> None:
        await service.put_site("a", {"webhook": webhook})

    run(_with(FileStore(path, CATALOG), work))
    made = {path.stat().st_mode & 0o777, lock.stat().st_mode & 0o777}
    path.chmod(0o644)
    lock.chmod(0o664)
    run(_with(FileStore(path, CATALOG), work))
    assert made == {0o600} and {path.stat().st_mode & 0o777, lock.stat().st_mode & 0o777} == {0o600}
    assert [entry.name for entry in tmp_path.iterdir() if entry.name.startswith(".")] == []  # no temporary left


def test_a_webhook_is_checked_when_its_url_is_written(make_store):
    """Issue 18: refused at write time when it names an address that is not public and not allowed; a site
    whose webhook the allowlist stopped admitting can still be written (its alerts are refused when sent)."""
    loopback = {"url": "http://127.0.0.1:9/hook", "secret": "a-secret-of-16-chars"}

    async def work(service: PolicyService) -> None:
        with pytest.raises(PolicyError) as refused:
            await service.put_site("a", {"webhook": loopback})
        assert refused.value.field == "webhook.url"
        service.store.webhook_allow = ("127.0.0.0/8",)
        await service.put_site("a", {"webhook": loopback})
        service.store.webhook_allow = ()
        await service.pause("a", ("site", None))  # the same URL: not checked again
        with pytest.raises(PolicyError):
            await service.set_site_fields("a", {"webhook": {**loopback, "url": "http://127.0.0.2/hook"}})

    run(_with(make_store(), work))


def test_a_site_at_its_size_bound_can_always_be_paused_and_resumed(make_store):
    """A pause is the subscriber's last resort: it must never be refused because the site is large."""

    async def work(service):
        await service.put_site("a", {"mode": "device", "devices": {"tv": {"policy": {"allow": NAMES}}}})
        document, _version = await service.get_site("a")
        service.store.limits = dataclasses.replace(
            LimitsSettings(), document_bytes=len(json.dumps(document, sort_keys=True))
        )
        for target in (("device", "tv"), ("site", None)):
            await service.pause("a", target, "2099-01-01T00:00:00Z")
            await service.unpause("a", target)
        with pytest.raises(PolicyError, match=r"limits\.document_bytes"):
            await service.put_device("a", "phone", {})

    run(_with(make_store(), work))


def test_a_site_over_a_lowered_bound_can_be_paused_and_trimmed_but_not_grown(make_store):
    async def work(service):
        await service.put_site("a", {"mode": "device", "devices": {"tv": {"policy": {"allow": NAMES}}}})
        service.store.limits = LIMITS  # lowered since: the site's list of 5 names is over it
        await service.pause("a", ("device", "tv"))
        await service.set_policy("a", ("device", "tv"), {"allow": NAMES[:4]})
        with pytest.raises(PolicyError, match=r"^devices\.tv\.policy\.allow: 5 names; at most 3"):
            await service.set_policy("a", ("device", "tv"), {"allow": NAMES})
        document, _version = await service.get_site("a")
        assert document["devices"]["tv"]["policy"]["allow"] == NAMES[:4]
        assert document["devices"]["tv"]["paused_until"] == "forever"

    run(_with(make_store(), work))


def test_the_operators_records_are_kept_announced_and_refused_with_their_line(make_store):
    lines = ["printer.office.example. A 192.168.1.20", "files.office.example. CNAME printer.office.example."]

    async def work(service):
        store = service.store
        assert await store.load_records() == ()

        async def writes() -> None:
            assert await store.set_records(lines) == tuple(lines)

        assert ("records", "-", 1) in await notices_of(make_store, writes, ("records", "-", 1))
        other = make_store()
        try:
            assert await other.load_records() == tuple(lines)  # another node reads them
        finally:
            await other.close()
        with pytest.raises(PolicyError) as refused:
            await store.set_records([*lines, "mail.office.example. MX ten mail.example."])
        assert refused.value.field == "records" and "line 3" in refused.value.reason
        with pytest.raises(PolicyError, match="must be a list"):
            await store.set_records("printer A 192.0.2.1")
        assert await store.load_records() == tuple(lines)  # a refused write changes nothing

    run(_with(make_store(), work))
