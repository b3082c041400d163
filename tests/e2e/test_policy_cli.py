"""`bns` straight to the store (no admin API), and `bns serve` beside it: a change reaches every worker
within a second."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import pytest

from resolver.admin.site_tokens import SiteTokens
from resolver.cli.sites import LocalSites
from resolver.shared.dns import OptionCode
from resolver.shared.store.page_tokens import Secret
from tests.conftest import eventually
from tests.e2e.test_process import bns, serving

pytestmark = pytest.mark.e2e
MAC = "02:00:00:00:00:07"


def local(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A `bns` command against the store of `config` (no admin API)."""
    return subprocess.run(bns(*args, "--config", str(config)), capture_output=True, text=True, timeout=60)


def blocked_everywhere(port: int, name: str, tries: int = 20) -> bool | None:
    """True if every query (each from a new socket, so spread over the workers) is paused, False if none
    is, None if the workers disagree."""
    mac = dns.edns.GenericOption(OptionCode.MAC, bytes.fromhex(MAC.replace(":", "")))
    query = dns.message.make_query(name, "A", use_edns=0, options=[mac])
    answers = set()
    for _ in range(tries):
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
        answers.add(
            any(option.otype == dns.edns.OptionType.EDE and option.text == "paused" for option in response.options)
        )
    return answers.pop() if len(answers) == 1 else None


@pytest.fixture(params=["redis", "file"])
def config(request, tmp_path, redis_prefix) -> Path:
    path = tmp_path / "bns.toml"
    if request.param == "redis":
        redis = request.getfixturevalue("shared_redis")
        store = f'redis = "{redis.url}"\nprefix = "{redis_prefix}"'
    else:
        store = f'file = "{tmp_path / "policies.json"}"'
    path.write_text(f'[store]\n{store}\n[identity]\ntrusted_networks = ["127.0.0.1/32"]\n')
    return path


def test_pause_through_the_cli_reaches_both_workers_within_a_second(config, upstream):
    assert local(config, "site", "set", "home", "--network", "127.0.0.0/8", "--mode", "device").returncode == 0
    assert local(config, "device", "set", "home", "tablet", "--mac", MAC).returncode == 0
    with serving(
        "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2"
    ) as (process, port):
        assert blocked_everywhere(port, "a.example") is False
        result = local(config, "device", "pause", "home", "tablet", "--for", "1h")
        assert result.returncode == 0, result.stderr
        assert eventually(lambda: blocked_everywhere(port, "b.example") is True, 1.5) <= 1.5
        assert local(config, "device", "unpause", "home", "tablet").returncode == 0
        eventually(lambda: blocked_everywhere(port, "c.example") is False, 1.5)
        process.terminate()
        assert process.wait(10) == 0


def test_cli_refuses_bad_writes_and_says_why(config):
    assert local(config, "site", "set", "home", "--network", "127.0.0.0/8").returncode == 0
    refused = local(config, "device", "set", "home", "tv", "--mac", "nope")
    assert refused.returncode == 2 and "devices.tv.macs[0]: 'nope' is not a MAC address" in refused.stderr
    refused = local(config, "policy", "set", "home", "--policy", '{"schedules": [{"name": "x"}]}')
    assert refused.returncode == 2 and "policy.schedules[0].days: missing" in refused.stderr
    missing = local(config, "device", "pause", "home", "ghost")
    assert missing.returncode == 3 and "site home has no device 'ghost'" in missing.stderr
    shown = local(config, "site", "show", "home", "--json")
    assert shown.returncode == 0 and '"devices": {}' in shown.stdout


def test_a_device_gets_a_new_client_id_from_the_cli(config):
    assert local(config, "site", "set", "home", "--network", "127.0.0.0/8").returncode == 0
    assert local(config, "device", "set", "home", "phone", "--client-id", "old").returncode == 0
    made = local(config, "device", "client-id", "home", "phone", "--json")
    assert made.returncode == 0, made.stderr
    client_id = json.loads(made.stdout)["client_id"]
    assert len(client_id) == 26 and client_id.isalnum() and client_id.islower()
    shown = json.loads(local(config, "site", "show", "home", "--json").stdout)
    assert shown["devices"]["phone"]["client_ids"] == [client_id]
    missing = local(config, "device", "client-id", "home", "ghost")
    assert missing.returncode == 3 and "site home has no device 'ghost'" in missing.stderr


def test_cli_with_redis_down_fails_with_exit_1(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "bns.toml"
    config.write_text(f'[store]\nredis = "redis://127.0.0.1:{port}/0"\n')
    result = local(config, "site", "set", "home", "--network", "127.0.0.0/8")
    assert result.returncode == 1 and "redis at redis://127.0.0.1" in result.stderr


def test_a_site_token_is_made_by_the_api_only_and_revoked_either_way(config):
    """Made straight from the store, a token could be signed with a key no API checks it with: refused,
    saying so. Revoking needs only the store."""

    async def check() -> None:
        sites = LocalSites(config, None, None)
        try:
            await sites.service.put_site("home", {})
            refused = local(config, "site", "token", "home")
            assert refused.returncode == 2 and "a site token needs the API (--api)" in refused.stderr
            tokens = SiteTokens(Secret("the-key-of-the-api", None), sites.service.store)  # as the API makes one
            token, claims = await tokens.issue("home", 1)
            revoked = local(config, "site", "token", "revoke", "home", claims.id, "--json")
            assert revoked.returncode == 0, revoked.stderr
            assert json.loads(revoked.stdout) == {"site": "home", "revoked": claims.id}
            assert await tokens.site_of(token) is None
        finally:
            await sites.close()

    asyncio.run(check())
