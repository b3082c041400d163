"""Strict configuration: defaults in one place, every bad key or value refused with its name and reason."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from resolver.shared.config import Endpoint, describe_settings, load_config, parse_endpoint, reloaded, shown
from resolver.shared.errors import ConfigError
from resolver.shared.sockets import _explain_bind_error
from resolver.shared.store.redis import SentinelTarget, check_redis_url, parse_sentinel_url

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bns.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file():
    config = load_config()
    assert config.server.listen == (Endpoint("127.0.0.1", 5300),)
    assert config.server.workers == 0 and config.server.worker_count >= 1
    assert config.upstream.deadline == 2.0


def test_file_values_and_flag_overrides(tmp_path):
    path = write(tmp_path, '[server]\nlisten = ["0.0.0.0:53"]\nworkers = 4\n[cache]\nsize = 10\n')
    config = load_config(path, {"server": {"listen": ["[::1]:5353", "127.0.0.2"]}})
    assert config.server.listen == (Endpoint("::1", 5353), Endpoint("127.0.0.2", 53))
    assert config.server.workers == 4
    assert config.cache.size == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nlisten_on = []\n", "server.listen_on: unknown key in [server]"),
        ("[cach]\nsize = 1\n", "cach: unknown key in the top level"),
        ("[server]\nworkers = -1\n", "server.workers: -1 is outside 0..256"),
        ("[server]\nworkers = 'two'\n", "server.workers: must be an integer"),
        ("[server]\nworkers = true\n", "server.workers: must be an integer"),
        ("[server]\nlisten = '127.0.0.1'\n", "server.listen: must be a list"),
        ("[server]\nlisten = []\n", "server.listen: must name at least one address"),
        ("[server]\nlisten = ['localhost:53']\n", "server.listen: 'localhost' is not an IP address"),
        ("[server]\nlisten = ['127.0.0.1:99999']\n", "server.listen: port '99999'"),
        ("[upstream]\nservers = ['[::1]x']\n", "upstream.servers:"),
        ("[log]\nlevel = 'loud'\n", "log.level: 'loud' is not one of debug, info, warning, error"),
        ("[cache]\nmin_ttl = 600\nmax_ttl = 60\n", "cache.min_ttl: 600 is above cache.max_ttl"),
        ("[upstream]\ntimeout = 3.0\ndeadline = 1.0\n", "upstream.deadline: 1.0 is shorter"),
        ("[upstream]\nkeep_case = ['dns.example']\n", "upstream.keep_case: 'dns.example' is not an IP address"),
        ("[upstream]\nkeep_case = '9.9.9.9'\n", "upstream.keep_case: must be a list"),
        ("[upstream]\nkeep_case = ['192.0.2.1']\n", "upstream.keep_case: 192.0.2.1:53 is not in upstream.servers"),
        ("[upstream]\ncase_randomization = 'yes'\n", "upstream.case_randomization: must be true or false"),
        ("[admin]\ntokens = ['site.operator-token-0001']\n", "admin.tokens: [0]: tokens starting with 'site.'"),
        ("[limits]\nnames_per_list = 0\n", "limits.names_per_list: 0 is outside 1..10000"),
        ("[limits]\ndevices = 20000\n", "limits.devices: 20000 is outside 1..10000"),
        ("[limits]\ndocument_bytes = '1M'\n", "limits.document_bytes: must be an integer, got '1M'"),
        ("[limits]\npasses = 5\n", "limits.passes: unknown key in [limits]"),
        ("[admin]\nmax_json = 100\n", "admin.max_json: 100 is outside 1024..4294967296"),
        ("[limits]\ndocument_bytes = 2000000\n", "admin.max_json: 1048576 is below limits.document_bytes (2000000)"),
        ("server = 3\n", "server: must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key_and_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)


def test_the_bounds_on_writes_and_bodies(tmp_path):
    config = load_config(write(tmp_path, "[limits]\ndocument_bytes = 2000000\n[admin]\nmax_json = 4000000\n"))
    assert (config.limits.document_bytes, config.admin.max_json) == (2_000_000, 4_000_000)
    assert config.limits.names_per_list == 1000 and config.admin.max_upload == 256 * 2**20


def test_relative_paths_of_a_file_are_its_directorys_and_those_of_flags_the_current_ones(tmp_path, monkeypatch):
    """Issue 19: a relative store.file was taken from the current directory, so `bns site set … --config
    /srv/bns/bns.toml` run elsewhere wrote a store the node never read."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "srv" / "bns.toml"
    path.parent.mkdir()
    path.write_text(
        '[lists]\npath = "lists/main.bns"\ncatalog = "../categories.toml"\ncache_dir = "cache"\n'
        '[admin]\nsource_roots = ["/srv/sources"]\n'
    )
    config = load_config(path)
    here = path.parent
    assert Path(config.lists.path) == here / "lists" / "main.bns"
    assert Path(config.lists.catalog) == here / "../categories.toml" and Path(config.lists.cache_dir) == here / "cache"
    assert Path(config.store.file) == here / "bns-policies.json"  # the default too: beside its file
    assert load_config(path, {"lists": {"path": "mine.bns"}}).lists.path == "mine.bns"  # a flag: as typed
    assert load_config(None).store.file == "bns-policies.json"  # no file: the current directory
    path.write_text('[store]\nfile = "/var/lib/bns/policies.json"\n[lists]\ncache_dir = ""\n')
    assert load_config(path).store.file == "/var/lib/bns/policies.json" and load_config(path).lists.cache_dir == ""


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_upstreams_that_keep_case_are_named_as_in_servers(tmp_path):
    text = "[upstream]\nservers = ['9.9.9.9', '[2620:fe::fe]:53']\nkeep_case = ['9.9.9.9:53', '2620:fe::fe']\n"
    upstream = load_config(write(tmp_path, text)).upstream
    assert upstream.keep_case == upstream.servers
    assert upstream.case_randomization


def test_a_config_written_for_socket_pools_still_loads(tmp_path):
    upstream = load_config(write(tmp_path, "[upstream]\nsockets = 8\nsocket_queries = 1000\n")).upstream
    assert (upstream.sockets, upstream.socket_queries) == (8, 1000)
    assert load_config().upstream.socket_queries == 1  # by default a socket, and a port, per query


def test_integers_are_accepted_for_seconds(tmp_path):
    assert load_config(write(tmp_path, "[upstream]\ntimeout = 1\n")).upstream.timeout == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9.9.9.9", Endpoint("9.9.9.9", 53)),
        ("127.0.0.1:5300", Endpoint("127.0.0.1", 5300)),
        ("::1", Endpoint("::1", 53)),
        ("[2001:db8::1]:853", Endpoint("2001:db8::1", 853)),
    ],
)
def test_endpoints(text, expected):
    assert parse_endpoint(text) == expected


def test_every_setting_is_described():
    rows = describe_settings()
    assert {"server.listen", "upstream.servers", "cache.size", "log.level"} <= {key for key, _, _ in rows}
    assert all(doc for _, _, doc in rows)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.EACCES, "CAP_NET_BIND_SERVICE"),
        (errno.EADDRINUSE, "already in use"),
        (errno.EADDRNOTAVAIL, "no interface"),
    ],
)
def test_bind_errors_say_what_to_do(code, hint):
    error = _explain_bind_error(Endpoint("0.0.0.0", 53), OSError(code, "x"))
    assert "0.0.0.0:53" in str(error) and hint in str(error)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sentinel://s1:26380,s2/bns", SentinelTarget((("s1", 26380), ("s2", 26379)), "bns")),
        ("sentinel://[::1]:5000/bns/3", SentinelTarget((("::1", 5000),), "bns", 3)),
        (
            "redis+sentinel://user:pa%40ss@s1/bns?sentinel_password=x",
            SentinelTarget((("s1", 26379),), "bns", 0, "user", "pa@ss", "x"),
        ),
    ],
)
def test_sentinel_urls(url, expected):
    assert parse_sentinel_url(url) == expected
    assert check_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://s1:port/bns", "is not a number"),
        ("sentinel://s1", "the path must be /service"),
        ("sentinel://s1/bns/zero", "the path must be /service"),
        ("sentinel://s1/bns?password=x", "unknown parameter 'password'"),
        ("http://s1/0", "expected redis://"),
    ],
)
def test_bad_redis_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=message):
        check_redis_url(url)
    with pytest.raises(ConfigError, match=r"store\.redis"):
        load_config(None, {"store": {"redis": url}})


def test_a_reload_applies_the_live_keys_and_names_the_others():
    current = load_config(None, {"upstream": {"servers": ["192.0.2.1"]}, "server": {"workers": 1}})
    loaded = load_config(
        None, {"upstream": {"servers": ["192.0.2.2"]}, "server": {"workers": 4}, "log": {"level": "debug"}}
    )
    merged, applied, restart = reloaded(current, loaded)
    assert sorted(applied) == ["log.level", "upstream.servers"]
    assert restart == ["server.workers"]
    assert merged.upstream.servers == loaded.upstream.servers and merged.log.level == "debug"
    assert merged.server.workers == 1  # needs a restart: the running value stays
    # `answer` is live but the page addresses it needs are not: the mix is refused whole
    paged = load_config(None, {"policy": {"answer": "page", "block_page": ["192.0.2.9"]}})
    with pytest.raises(ConfigError, match=r"policy\.answer"):
        reloaded(current, paged)


def test_secrets_are_shown_hidden_and_redis_urls_without_their_credentials():
    config = load_config(
        None,
        {
            "admin": {"tokens": ["admin-token-0123456789"], "read_tokens": ["read-token-0123456789"]},
            "pages": {"secret": "pages-secret-0123456789"},
            "store": {"redis": "sentinel://bns:hunter2@127.0.0.1:26379/bns?sentinel_password=sesame"},
        },
    )
    assert shown(config, "admin.tokens") == shown(config, "admin.read_tokens") == "(hidden)"
    assert shown(config, "pages.secret") == "(hidden)"
    assert shown(config, "store.redis") == "sentinel://…@127.0.0.1:26379/bns?…"
    assert shown(config, "server.workers") == 0 and shown(config, "upstream.servers") == [
        "9.9.9.9:53",
        "149.112.112.112:53",
    ]


@pytest.mark.parametrize(
    "url",
    ["sentinel://bns:hunter2@127.0.0.1:26379/", "sentinel://127.0.0.1:26379/bns?sentinel_password=hunter2&x=1"],
)
def test_a_bad_redis_url_is_refused_without_showing_its_password(url):
    with pytest.raises(ConfigError, match=r"store\.redis") as refused:
        load_config(None, {"store": {"redis": url}})
    assert "hunter2" not in str(refused.value)
