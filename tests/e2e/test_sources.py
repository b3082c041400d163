"""List sources kept by the admin API and compiled on the server: upload or register by path, validate,
build with `bns lists build`, publish to every node."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from tests.conftest import FIXTURES, eventually
from tests.e2e.test_admin import GORE, READ, WEAPON, cli, every_worker, http, node_config, start

pytestmark = pytest.mark.e2e


def test_sources_uploaded_to_one_node_are_built_on_another_and_served_by_both(
    tmp_path, upstream, shared_redis, redis_prefix
):
    store = f'[store]\nredis = "{shared_redis.url}"\nprefix = "{redis_prefix}"'
    with ExitStack() as stack:
        port_a, api_a = start(stack, node_config(tmp_path / "a" / "bns.toml", store), upstream)
        port_b, api_b = start(stack, node_config(tmp_path / "b" / "bns.toml", store), upstream)
        for category in ("weapons", "violence-gore"):
            added = cli(api_a, "lists", "source", "add", category, str(FIXTURES / f"{category}.txt.gz"), "--json")
            assert added.returncode == 0, added.stderr
            entry = json.loads(added.stdout)
            assert entry["category"] == category and entry["kind"] == "upload" and entry["entries"] > 0
        listed = cli(api_b, "lists", "source", "list", token=READ)
        assert listed.returncode == 0 and "weapons" in listed.stdout and "violence-gore" in listed.stdout

        built = cli(api_b, "lists", "build", "--publish", "--json")
        assert built.returncode == 0, built.stderr
        job = json.loads(built.stdout)
        assert job["state"] == "done" and job["published"] and set(job["per_category"]) == {"weapons", "violence-gore"}
        for port in (port_a, port_b):
            eventually(
                lambda port=port: (
                    every_worker(port, GORE, "blocked: violence-gore")
                    and every_worker(port, WEAPON, "blocked: weapons")
                ),
                5,
            )
        assert http(api_a, "GET", "/v1/lists")[1]["current"] == job["version"]

        # Removing a source and building again drops its names everywhere.
        source = next(
            entry["id"]
            for entry in json.loads(cli(api_a, "lists", "source", "list", "--json").stdout)
            if entry["category"] == "weapons"
        )
        assert cli(api_a, "lists", "source", "remove", "weapons", source).returncode == 0
        assert cli(api_a, "lists", "build", "--publish").returncode == 0
        for port in (port_a, port_b):
            eventually(lambda port=port: every_worker(port, WEAPON, None), 5)


@pytest.fixture
def source_node(tmp_path, upstream):
    roots = tmp_path / "lists"
    roots.mkdir()
    config = node_config(
        tmp_path / "n" / "bns.toml",
        f'[store]\nfile = "{tmp_path / "policies.json"}"',
        max_upload=16384,
        source_roots=[str(roots)],
    )
    with ExitStack() as stack:
        yield (*start(stack, config, upstream), roots)


def test_sources_are_validated_when_added(source_node, tmp_path):
    _port, api, roots = source_node
    weapons = (FIXTURES / "weapons.txt.gz").read_bytes()
    got, answer = http(api, "POST", "/v1/sources/gambling", data=weapons)
    assert got == 422 and answer["error"]["field"] == "category"
    got, answer = http(api, "POST", "/v1/sources/weapons", data=b"<html>not a list</html>\n!!!\n")
    assert got == 400 and "no usable domain" in answer["error"]["message"] and "line 1" in answer["error"]["message"]
    got, answer = http(api, "POST", "/v1/sources/weapons", data=b"x" * 20000)
    assert got == 413
    got, _ = http(api, "POST", "/v1/sources/weapons", data=weapons, token=READ)
    assert got == 403
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("example.com\n")
    got, answer = http(api, "POST", "/v1/sources/weapons/path", {"path": str(outside)})
    assert got == 422 and answer["error"]["field"] == "path" and "admin.source_roots" in answer["error"]["message"]
    got, answer = http(api, "POST", "/v1/sources/weapons/path", {"path": str(roots / "missing.txt")})
    assert got == 422 and "not a file" in answer["error"]["message"]
    for bad in ("relative/list.txt", f"{roots}/nul\x00.txt"):
        got, answer = http(api, "POST", "/v1/sources/weapons/path", {"path": bad})
        assert got == 422 and answer["error"]["field"] == "path"
    escape = roots / "escape.txt"
    escape.symlink_to(outside)  # a link out of the roots is judged by where it leads
    got, answer = http(api, "POST", "/v1/sources/weapons/path", {"path": str(escape)})
    assert got == 422 and "admin.source_roots" in answer["error"]["message"]
    got, _ = http(api, "DELETE", "/v1/sources/weapons/weapons-000000000000")
    assert got == 404
    assert http(api, "GET", "/v1/sources")[1] == []  # nothing refused was kept
    failed = cli(api, "lists", "build")
    assert failed.returncode == 2 and "no sources" in failed.stderr


def test_a_path_source_is_checked_again_at_build_and_removed_only_from_its_category(source_node, tmp_path):
    _port, api, roots = source_node
    listed = roots / "list.txt"
    listed.write_text("first.example\n")
    got, entry = http(api, "POST", "/v1/sources/drugs/path", {"path": str(listed)})
    assert got == 201 and entry["id"].startswith("drugs-p")
    secret = tmp_path / "secret.txt"
    secret.write_text("token = not-a-list\n")
    listed.unlink()
    listed.symlink_to(secret)  # swapped for a link out of the roots after it was added
    got, job = http(api, "POST", "/v1/lists/compile", data=b"")  # no body: publish defaults to false
    assert got == 202
    eventually(lambda: http(api, "GET", f"/v1/lists/compile/{job['id']}")[1]["state"] != "running", 10)
    finished = http(api, "GET", f"/v1/lists/compile/{job['id']}")[1]
    assert finished["state"] == "failed" and "admin.source_roots" in finished["error"]
    assert "not-a-list" not in finished["error"]
    assert http(api, "DELETE", f"/v1/sources/weapons/{entry['id']}")[0] == 404
    assert http(api, "DELETE", f"/v1/sources/drugs/{entry['id']}")[0] == 200


def test_without_redis_a_path_source_is_read_at_each_build(source_node):
    port, api, roots = source_node
    listed = roots / "drugs.hosts"
    listed.write_text("0.0.0.0 first.example\n")
    added = cli(api, "lists", "source", "add", "drugs", str(listed), "--on-server", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["format"] == "hosts"
    assert cli(api, "lists", "build", "--publish").returncode == 0
    eventually(lambda: every_worker(port, "first.example", "blocked: drugs"), 5)
    listed.write_text("0.0.0.0 second.example\n")
    assert cli(api, "lists", "build", "--publish").returncode == 0
    eventually(
        lambda: every_worker(port, "second.example", "blocked: drugs") and every_worker(port, "first.example", None), 5
    )
