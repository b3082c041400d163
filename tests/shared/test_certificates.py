"""The DoT and DoH certificate: what start-up refuses (through the one `check(config)` that `bns serve` and `bns
config --check` make), and how a running node takes new files."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from resolver.shared import certificates
from resolver.shared.certificates import Certificates, load_pair
from resolver.shared.config import Config
from resolver.shared.errors import ConfigError
from resolver.supervisor.process import check
from tests.certificates import NAME, Authority, Pair
from tests.conftest import make_config

pytestmark = pytest.mark.unit
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("ca"))


def tls_config(pair: Pair, **tls: object) -> Config:
    settings = {
        "dot_listen": ["127.0.0.1:0"],
        "doh_listen": ["127.0.0.1:0"],
        "certificate": str(pair.certificate),
        "key": str(pair.key),
        "name": NAME,
        **tls,
    }
    return make_config(["127.0.0.1:9"], tls=settings)


def refused(config: Config) -> str:
    with pytest.raises(ConfigError) as refusal:
        check(config)
    return str(refusal.value)


def test_a_good_pair_passes_the_start_up_check(authority):
    check(tls_config(authority.issue("good")))


def test_missing_or_unreadable_files_are_refused_naming_their_key(authority, tmp_path):
    pair = authority.issue("files")
    assert refused(tls_config(pair, certificate=str(tmp_path / "none.pem"))).startswith(
        f"tls.certificate: cannot read {tmp_path / 'none.pem'}: No such file"
    )
    assert refused(tls_config(pair, key=str(tmp_path))).startswith(f"tls.key: cannot read {tmp_path}: Is a directory")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert refused(tls_config(pair, certificate=str(junk))) == f"tls.certificate: {junk} holds no PEM certificate"
    assert refused(tls_config(pair, key=str(junk))) == f"tls.key: {junk} cannot be used: it holds no PEM private key"


def test_a_key_of_another_pair_is_refused(authority):
    one, other = authority.issue("one"), authority.issue("other")
    assert refused(tls_config(one, key=str(other.key))) == (
        f"tls.key: {other.key} is not the key of the certificate in {one.certificate} (tls.certificate)"
    )


def test_an_expired_or_not_yet_valid_certificate_is_refused(authority):
    expired = authority.issue("expired", valid_from=-10 * DAY, valid_for=5 * DAY)
    assert refused(tls_config(expired)).startswith(f"tls.certificate: {expired.certificate} expired on ")
    early = authority.issue("early", valid_from=2 * DAY)
    assert refused(tls_config(early)).startswith(f"tls.certificate: {early.certificate} is not valid before ")


def test_a_certificate_without_tls_name_is_refused(authority):
    other = authority.issue("other-name", names=("dns.elsewhere.example",))
    assert refused(tls_config(other)) == (
        f"tls.certificate: {other.certificate} does not hold tls.name {NAME} (it holds: dns.elsewhere.example)"
    )
    wildcard = authority.issue("wildcard", names=("*.test.example",))  # *.test.example holds dns.test.example
    check(tls_config(wildcard))


def test_without_a_wildcard_the_server_name_cannot_carry_client_ids(authority, caplog):
    caplog.set_level(logging.WARNING)
    Certificates(tls_config(authority.issue("plain", names=(NAME,))).tls)
    assert f"does not hold *.{NAME}" in caplog.text


def test_the_listen_addresses_take_their_ports_and_serve_one_protocol_each(authority):
    pair = authority.issue("ports")
    config = tls_config(pair, dot_listen=["127.0.0.1"], doh_listen=["[::1]"])
    assert (config.tls.dot_listen[0].port, config.tls.doh_listen[0].port) == (853, 443)
    with pytest.raises(ConfigError, match=r"tls\.doh_listen: 127\.0\.0\.1:853 is in tls\.dot_listen too"):
        tls_config(pair, dot_listen=["127.0.0.1"], doh_listen=["127.0.0.1:853"])


def _replace(target: Pair, source: Pair) -> None:
    """Put `source`'s files in `target`'s place, each by a rename (as certbot and most tools do)."""
    for new, old in ((source.certificate, target.certificate), (source.key, target.key)):
        os.replace(new, old)


@pytest.mark.logs("the new TLS certificate pair is refused")
def test_new_files_are_taken_when_seen_twice_or_on_sighup_and_a_bad_pair_is_refused(authority, tmp_path, caplog):
    live = authority.issue("live")
    certificates = Certificates(tls_config(live).tls)
    first = certificates.pair
    _replace(live, authority.issue("second"))
    assert not certificates.check(settled=False)  # seen once: perhaps half written
    assert certificates.check(settled=False) and certificates.pair is not first
    second = certificates.pair
    _replace(live, authority.issue("third"))
    assert certificates.check() and certificates.pair is not second  # SIGHUP: at once
    third = certificates.pair
    os.replace(authority.issue("stray").key, live.key)  # a key of another certificate
    with caplog.at_level(logging.ERROR):
        assert not certificates.check()
        assert not certificates.check()  # refused once, not again until the files change again
    assert certificates.pair is third and certificates.reloads == {"loaded": 2, "refused": 1}
    assert caplog.text.count("the new TLS certificate pair is refused; still serving the one loaded before") == 1


def _served_certificate(context: ssl.SSLContext) -> bytes:
    """The certificate (DER) a server with `context` presents, by a handshake in memory."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]  # (in, out) of the client, of the server
    client = client_context.wrap_bio(*pipes[0], server_hostname=NAME)
    server = context.wrap_bio(*pipes[1], server_side=True)
    for _ in range(10):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        pipes[1][0].write(pipes[0][1].read())
        pipes[0][0].write(pipes[1][1].read())
    certificate = client.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def test_the_pair_served_is_the_one_checked_even_when_the_files_change_meanwhile(authority, monkeypatch):
    """Files replaced between the checks and the load (a renewal's renames landing just then) must not serve a
    pair that was never checked: here an expired pair is renamed into place right after the files are read."""
    live, expired = authority.issue("racing"), authority.issue("stale", valid_from=-10 * DAY, valid_for=5 * DAY)
    want = x509.load_pem_x509_certificates(live.certificate.read_bytes())[0].public_bytes(Encoding.DER)
    read = certificates._read

    def read_then_replace(path: str, key: str) -> bytes:
        content = read(path, key)
        if key == "tls.key":
            _replace(live, expired)
        return content

    monkeypatch.setattr(certificates, "_read", read_then_replace)
    pair = load_pair(tls_config(live).tls, time.time())
    assert all(_served_certificate(context) == want for context in pair.contexts.values())
