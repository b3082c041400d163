"""The certificate the DoT and DoH listeners present: read from `tls.certificate` and `tls.key`, checked, and kept
current while the node runs.

A pair is checked before it serves, at start-up (`check(config)`, so by `bns config --check` too) and whenever
the files change: both files readable, the key the certificate's own, the certificate valid now, and holding
`tls.name`. A pair that fails stops start-up with an error naming the key at fault; at run time it is refused
with a log line, and the pair already serving goes on.

New connections get the newest pair while open ones keep the one they began with: each listener has one
*front* context for good, whose SNI callback (which also notes the server name a client asked for: a client id
may be its first label) moves each new connection onto the newest pair's context. The front contexts are made
before the supervisor forks, so every worker has the same session ticket keys, and a client resumes its TLS
session (RFC 8446 §2.2) on whichever worker the kernel hands its next connection to; the keys last as long as
the node (a restart makes new ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from resolver.shared.config import TlsSettings
from resolver.shared.errors import ConfigError

log = logging.getLogger(__name__)

# The ALPN identifiers each listener offers: RFC 7858 §3.2 registers "dot"; DoH is HTTP/2 or HTTP/1.1.
ALPN = {"dot": ("dot",), "doh": ("h2", "http/1.1")}
CHECK_INTERVAL = 2.0  # seconds between looks at the files' modification times

_Files = tuple[tuple[int, int, int], ...]  # (inode, size, mtime) of the certificate and of the key


@dataclass(frozen=True)
class Pair:
    """A checked certificate and key: what the listeners serve with, and what the node says about it."""

    contexts: dict[str, ssl.SSLContext]  # by listener: "dot", "doh"
    pem: tuple[bytes, bytes]  # the certificate chain and the key, as checked
    names: tuple[str, ...]  # the DNS names the certificate holds
    not_after: float  # when it expires (Unix time)
    files: _Files
    wildcard: bool  # whether it holds {id}.{tls.name}: client ids in the server name


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _files(settings: TlsSettings) -> _Files:
    """The files' identities, to tell that they changed; a missing file is an identity of its own."""
    found = []
    for path in (settings.certificate, settings.key):
        try:
            status = os.stat(path)
        except OSError:
            found.append((0, 0, 0))
            continue
        found.append((status.st_ino, status.st_size, status.st_mtime_ns))
    return tuple(found)


def _holds(patterns: tuple[str, ...], name: str) -> bool:
    """Whether a certificate for `patterns` is good for `name` (RFC 6125 §6.4: a wildcard is a whole first
    label, and matches exactly one label)."""
    for pattern in patterns:
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def server_context(chain: bytes, key: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A server context for TLS 1.2 and later offering `alpn`, with the pair whose PEM bytes are given. Raises
    ssl.SSLError, OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996 retires 1.0 and 1.1; RFC 7858 §3.2 asks for 1.2+
    context.options |= ssl.OP_NO_RENEGOTIATION  # TLS 1.2 renegotiation: CPU for the client's asking
    # From the very bytes that were checked, not the paths again: files replaced between the check and the load
    # would otherwise serve a pair nobody checked. `ssl` loads only from paths, so the bytes go to anonymous
    # in-memory files (never to disk: the key is in them).
    with _memory_file(chain) as chain_path, _memory_file(key) as key_path:
        context.load_cert_chain(chain_path, key_path)
    context.set_alpn_protocols(list(alpn))
    return context


@contextlib.contextmanager
def _memory_file(content: bytes) -> Iterator[str]:
    """A path that reads `content`, held in memory only, for as long as the block runs."""
    descriptor = os.memfd_create("bns-tls", os.MFD_CLOEXEC)
    try:
        written = 0
        while written < len(content):
            written += os.write(descriptor, content[written:])
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)


def load_pair(settings: TlsSettings, now: float) -> Pair:
    """The pair of `settings`, checked. Raises ConfigError naming the key at fault."""
    files = _files(settings)
    chain, key_pem = _read(settings.certificate, "tls.certificate"), _read(settings.key, "tls.key")
    try:
        certificate = x509.load_pem_x509_certificates(chain)[0]
    except ValueError:
        raise ConfigError(f"tls.certificate: {settings.certificate} holds no PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "it holds no PEM private key"
        raise ConfigError(f"tls.key: {settings.key} cannot be used: {reason}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = private_key.public_key().public_bytes(serialization.Encoding.DER, spki)
    if certificate.public_key().public_bytes(serialization.Encoding.DER, spki) != ours:
        raise ConfigError(
            f"tls.key: {settings.key} is not the key of the certificate in {settings.certificate} (tls.certificate)"
        )
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if moment > certificate.not_valid_after_utc:
        raise ConfigError(
            f"tls.certificate: {settings.certificate} expired on {_stamp(certificate.not_valid_after_utc)}"
        )
    if moment < certificate.not_valid_before_utc:
        raise ConfigError(
            f"tls.certificate: {settings.certificate} is not valid before {_stamp(certificate.not_valid_before_utc)}"
        )
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(name.lower() for name in alternatives.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    if not _holds(names, settings.name):
        raise ConfigError(
            f"tls.certificate: {settings.certificate} does not hold tls.name {settings.name} "
            f"(it holds: {', '.join(names) or 'no DNS name'})"
        )
    try:
        contexts = {kind: server_context(chain, key_pem, alpn) for kind, alpn in ALPN.items()}
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.certificate: {settings.certificate} cannot be used with tls.key: {exc}") from None
    return Pair(
        contexts,
        (chain, key_pem),
        names,
        certificate.not_valid_after_utc.timestamp(),
        files,
        _holds(names, f"id.{settings.name}"),
    )


class Certificates:
    """The pair the listeners serve with now, its front contexts (see the module's docstring), and the server
    name each TLS connection asked for."""

    def __init__(self, settings: TlsSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self.pair = load_pair(settings, self._clock())
        self.loaded_at = self._clock()
        self.reloads = {"loaded": 0, "refused": 0}  # metrics: bns_tls_certificate_reloads_total
        self._changing: _Files | None = None  # files seen changed once: loaded when seen so a second time
        self._refused: _Files | None = None  # files whose pair was refused: not tried again until they change
        self._names: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        self.fronts: dict[str, ssl.SSLContext] = {}
        for kind, alpn in ALPN.items():
            front = server_context(*self.pair.pem, alpn)
            front.sni_callback = partial(self._on_hello, kind)
            self.fronts[kind] = front
        if not self.pair.wildcard:
            log.warning(
                "tls.certificate %s does not hold *.%s: a client id in the server name ({id}.%s) will fail "
                "certificate validation; the DoH path (%s/{id}) still works",
                settings.certificate,
                settings.name,
                settings.name,
                settings.doh_path,
            )

    def _on_hello(self, kind: str, connection: ssl.SSLObject, server_name: str | None, _front: ssl.SSLContext) -> None:
        """Called by OpenSSL on each ClientHello, with or without a server name: the connection is moved onto
        the newest pair (its listener's context of it), and the name it asked for is noted."""
        if server_name is not None:
            self._names[connection] = server_name
        connection.context = self.pair.contexts[kind]

    def server_name(self, connection: ssl.SSLObject) -> str | None:
        """The server name (SNI) a connection asked for, if any."""
        return self._names.get(connection)

    def check(self, settled: bool = True) -> bool:
        """Serve the files' pair if they changed; True when a new pair was taken. Unless `settled` (SIGHUP says
        the files are in place), a change is acted on only once seen twice in a row, so that a pair replaced
        one file at a time is not caught half-written. A pair that fails its checks is refused, logged once."""
        files = _files(self._settings)
        if files in (self.pair.files, self._refused):
            self._changing = None
            return False
        if not settled and files != self._changing:
            self._changing = files
            return False
        self._changing = None
        try:
            pair = load_pair(self._settings, self._clock())
        except ConfigError as exc:
            self._refused = files
            self.reloads["refused"] += 1
            log.error("the new TLS certificate pair is refused; still serving the one loaded before: %s", exc)
            return False
        self.pair, self.loaded_at, self._refused = pair, self._clock(), None
        self.reloads["loaded"] += 1
        log.info(
            "TLS certificate %s loaded for new connections (valid until %s)",
            self._settings.certificate,
            _stamp(datetime.datetime.fromtimestamp(pair.not_after, datetime.UTC)),
        )
        return True

    async def watch(self) -> None:
        """Until cancelled: look at the files every CHECK_INTERVAL seconds."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self.check(settled=False)
