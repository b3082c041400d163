"""What one request may send and store through the admin API (issue 18: one subscriber could slow every
other): a site token writes within `[limits]`, as an operator does; a JSON body over `admin.max_json` is
refused, before it is read when its length is given."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from resolver.shared.config import AdminSettings, LimitsSettings
from tests.conftest import redis_policy_store
from tests.shared.test_store_faults import API_TOKEN, api_over

pytestmark = pytest.mark.integration
OPERATOR = {"Authorization": f"Bearer {API_TOKEN}"}
HOME = {"networks": ["192.0.2.0/24"], "mode": "device", "devices": {"tv": {"name": "TV"}}}
MAX_JSON = AdminSettings().max_json


def names(count: int) -> list[str]:
    return [f"allowed-{index}.example.com" for index in range(count)]


async def _with_api(shared_redis, redis_prefix, tmp_path, work, limits: LimitsSettings | None = None) -> Any:
    """`work(client, site token headers)` against the API of a node (max_upload 256 MiB, as by default), over
    a site "home" the operator made."""
    store = redis_policy_store(shared_redis.url, redis_prefix)
    store.limits = limits or LimitsSettings()
    api = api_over(store, tmp_path, max_upload=256 * 2**20, max_json=MAX_JSON)
    try:
        async with TestClient(TestServer(api.app())) as client:
            assert (await client.put("/v1/sites/home", json=HOME, headers=OPERATOR)).status == 200
            token, _expires = await api.site_tokens.issue("home", 1)
            return await work(client, {"Authorization": f"Bearer {token}"})
    finally:
        await store.close()


async def _site(client: TestClient) -> dict[str, Any]:
    return await (await client.get("/v1/sites/home", headers=OPERATOR)).json()


def test_a_site_tokens_device_with_a_huge_allow_list_is_refused_naming_the_bound(shared_redis, redis_prefix, tmp_path):
    """The attack of issue 18: a device of 10,000 names, PUT with the subscriber's own token."""

    async def work(client: TestClient, subscriber: dict[str, str]) -> None:
        before = await _site(client)
        device = {"name": "TV", "policy": {"allow": names(10_000)}}
        response = await client.put("/v1/sites/home/devices/tv", data=json.dumps(device), headers=subscriber)
        error = (await response.json())["error"]
        assert response.status == 422, error
        assert error["field"] == "devices.tv.policy.allow"
        assert error["message"] == "10000 names; at most 1000 (limits.names_per_list)"
        assert await _site(client) == before  # nothing written
        device["policy"]["allow"] = names(1000)
        assert (await client.put("/v1/sites/home/devices/tv", json=device, headers=subscriber)).status == 200

    asyncio.run(_with_api(shared_redis, redis_prefix, tmp_path, work))


def test_a_site_token_and_an_operator_are_held_to_the_same_bounds(shared_redis, redis_prefix, tmp_path):
    async def work(client: TestClient, subscriber: dict[str, str]) -> None:
        assert (await client.put("/v1/sites/home/devices/phone", json={}, headers=subscriber)).status == 200
        before = await _site(client)
        for headers in (subscriber, OPERATOR):
            response = await client.put("/v1/sites/home/devices/laptop", json={}, headers=headers)
            error = (await response.json())["error"]
            assert response.status == 422 and error["field"] == "devices", error
            assert error["message"] == "3 devices; at most 2 (limits.devices)"
        whole = {**HOME, "devices": {f"d{index}": {} for index in range(3)}}
        assert (await client.put("/v1/sites/home", json=whole, headers=OPERATOR)).status == 422
        response = await client.put("/v1/sites/home/devices/tv/policy", json={"deny": names(4)}, headers=subscriber)
        assert response.status == 422
        assert (await response.json())["error"]["message"] == "4 names; at most 3 (limits.names_per_list)"
        assert await _site(client) == before

    limits = LimitsSettings(names_per_list=3, devices=2)
    asyncio.run(_with_api(shared_redis, redis_prefix, tmp_path, work, limits))


def test_a_json_body_over_max_json_is_refused_before_it_is_read(shared_redis, redis_prefix, tmp_path):
    """Its Content-Length says 100 MB and 1 kB of it is sent: the 413 comes at once, without the rest."""

    async def work(client: TestClient, subscriber: dict[str, str]) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            b"PUT /v1/sites/home/devices/tv HTTP/1.1\r\nHost: bns\r\nContent-Type: application/json\r\n"
            + f"Authorization: {subscriber['Authorization']}\r\nContent-Length: 100000000\r\n\r\n".encode()
            + b'{"name": "'
            + b"x" * 1000
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        writer.close()
        assert head.startswith(b"HTTP/1.1 413 ")
        return body

    body = asyncio.run(_with_api(shared_redis, redis_prefix, tmp_path, work))
    assert body["error"]["message"] == f"the body is larger than admin.max_json ({MAX_JSON} bytes)"


def test_a_chunked_json_body_over_max_json_is_refused(shared_redis, redis_prefix, tmp_path):
    """No length given: refused once past the bound, nothing written (uploads keep admin.max_upload)."""

    async def work(client: TestClient, subscriber: dict[str, str]) -> None:
        before = await _site(client)

        async def chunks():
            yield b'{"name": "'
            for _ in range(MAX_JSON // 65536 + 1):
                yield b"x" * 65536
            yield b'"}'

        response = await client.put("/v1/sites/home/devices/tv", data=chunks(), headers=subscriber)
        assert response.status == 413, await response.text()
        assert "admin.max_json" in (await response.json())["error"]["message"]
        assert await _site(client) == before

    asyncio.run(_with_api(shared_redis, redis_prefix, tmp_path, work))
