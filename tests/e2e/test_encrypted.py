"""A whole `bns serve` with DoT and DoH: two workers on shared ports, real clients (kdig, dnspython, OpenSSL), TLS
sessions resumed whichever worker takes the next connection, the certificate replaced and reloaded on SIGHUP, and a
bad certificate refused by `bns config --check` with the key named."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import dns.message
import dns.query
import pytest

from tests.certificates import NAME, Authority
from tests.conftest import answer_addresses, eventually
from tests.e2e.test_process import bns, node

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed (Debian: knot-dnsutils)")
def test_a_node_serves_dot_and_doh_resumes_sessions_on_any_worker_and_takes_a_new_certificate_on_sighup(
    tmp_path, upstream
):
    authority = Authority(tmp_path / "ca")
    live = authority.issue("live")
    config = tmp_path / "bns.toml"
    config.write_text(
        f'[tls]\ndot_listen = ["127.0.0.1:0"]\ndoh_listen = ["127.0.0.1:0"]\ncertificate = "{live.certificate}"\n'
        f'key = "{live.key}"\nname = "{NAME}"\n'
    )
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--upstream", upstream.address, "--workers", "2")
    with node(*args) as (process, _port, _admin):
        found = re.search(r"dot 127\.0\.0\.1:(\d+), doh 127\.0\.0\.1:(\d+)", process.log)
        assert found, process.log
        dot, doh = int(found.group(1)), int(found.group(2))
        ask = ["kdig", "@127.0.0.1", "-p", str(dot), "+tls", f"+tls-ca={authority.path}", f"+tls-hostname={NAME}"]
        kdig = subprocess.run(
            [*ask, "+timeout=3", "example.com"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "status: NOERROR" in kdig.stdout, kdig.stdout + kdig.stderr
        context = ssl.create_default_context(cafile=str(authority.path))
        query = dns.message.make_query("example.com", "A")
        doh_url = f"https://{NAME}:{doh}/dns-query"
        assert answer_addresses(dns.query.https(query, doh_url, bootstrap_address="127.0.0.1", verify=context))

        def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
            sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", dot)), server_hostname=NAME, session=session
            )
            dns.query.tls(query, "127.0.0.1", sock=sock, timeout=3)  # TLS 1.3: the tickets come after the handshake
            return sock

        with connect() as first:
            session, serial = first.session, first.getpeercert()["serialNumber"]
        resumed = []
        for _ in range(8):  # new source ports: the kernel spreads them over both workers
            with connect(session) as again:
                resumed.append(again.session_reused)
        assert all(resumed), resumed  # every worker took the one session ticket: their keys are the same

        second = authority.issue("second")
        os.replace(second.certificate, live.certificate)
        os.replace(second.key, live.key)
        process.send_signal(signal.SIGHUP)

        def new_serial() -> bool:
            with connect() as sock:
                return sock.getpeercert()["serialNumber"] != serial

        eventually(lambda: all(new_serial() for _ in range(6)), 5)  # on both workers
        eventually(lambda: process.log.count("TLS certificate") >= 2, 5)
    assert "SIGHUP: nothing to apply but the TLS certificate files" in process.log


def test_config_check_names_the_key_of_a_bad_certificate(tmp_path):
    authority = Authority(tmp_path / "ca")
    expired = authority.issue("expired", valid_from=-datetime.timedelta(days=10), valid_for=datetime.timedelta(days=1))
    config = tmp_path / "bns.toml"
    config.write_text(
        f'[tls]\ndot_listen = ["127.0.0.1:0"]\ncertificate = "{expired.certificate}"\nkey = "{expired.key}"\n'
        f'name = "{NAME}"\n'
    )
    checked = subprocess.run(bns("config", "--check", str(config)), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    assert f"tls.certificate: {expired.certificate} expired on " in checked.stderr
    Path(expired.certificate).unlink()
    checked = subprocess.run(bns("config", "--check", str(config)), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and "tls.certificate: cannot read" in checked.stderr
