"""Signs, in the names a device asks for, that it is infected or leaks data through DNS.

- **Machine-made names.** Malware with a domain generation algorithm (DGA) asks for hundreds of random names a
  day until one reaches its command server. The label a name is registered under is scored by a character
  trigram model of the names people use (`name_model.json.gz`, built by `python -m bench.dga train` from the
  Umbrella top-100k names, and measured by `python -m bench.dga measure`: false positives on those names
  cross-validated, true positives on the published DGAs of two malware families).
- **DNS tunnelling.** Data smuggled out in query names: many distinct names under one domain from one device
  within a window, with long high-entropy labels, or a burst of TXT queries under one domain.
- **Bypassing the filter.** A public DNS-over-HTTPS or -TLS server's name (the encrypted-dns category) asked for
  while the device's policy blocks it: an app or a browser with DNS of its own trying to leave the filter.

Only names that reach the miss path are judged for the first two; the answer cached for a machine-made name
keeps the verdict, so that each client asking it later is flagged as well (the cache-hit path pays one
attribute check). A name listed as malware or phishing is flagged whatever the answer (blocked, warned, or
passed by the device's "continue anyway"); an encrypted DNS server's only when it is blocked (an answer built
without the cache: the query path checks its categories there only). A client is flagged once per (reason,
domain) per `_REPEAT_AFTER` seconds: counted (bns_threat_alerts_total), logged (at most `_LOG_LINES` a minute)
and kept among the worker's newest alerts, which the admin API lists.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resolver.shared.dns import name_to_text
from resolver.worker.wire import registered_domain

_log = logging.getLogger(__name__)
_MODEL = Path(__file__).with_name("name_model.json.gz")
_START, _END = "^", "$"
_WINDOW = 10.0  # seconds over which a tunnel's names are counted
_TUNNEL_NAMES = 30  # distinct long names under one domain from one device within the window
_TUNNEL_LABEL = 20  # a label at least this long, of high entropy, counts towards a tunnel
_TUNNEL_ENTROPY = 3.5  # bits per character (English text is about 4 over letters and digits; random base32, 5)
_TXT_BURST = 30  # TXT queries under one domain from one device within the window
_REPEAT_AFTER = 3600.0
_TXT = 16
_LOG_LINES = 20


@dataclass(frozen=True, slots=True)
class Alert:
    """One sign seen: when (Unix time), the client's site (if any) and who it is, the name, and why."""

    at: float
    site: str | None
    client: str
    device: str  # the device's key in its site's seen-devices records (Identity.key)
    name: str
    reason: str  # "dga", "tunnel", "bypass", or the threat category the name is listed in ("malware", "phishing")
    detail: str


class NameModel:
    """How likely each next character of a label is after the two before it, in names people use: trigram
    counts interpolated with bigram counts (so an unseen pair of characters is unlikely, not impossible)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self._trigrams: dict[str, int] = document["trigrams"]
        self._pairs: dict[str, int] = document["pairs"]  # how often each two characters start a trigram
        self._bigrams: dict[str, int] = document["bigrams"]
        self._singles: dict[str, int] = document["singles"]  # how often each character starts a bigram
        self._weight = float(document["trigram_weight"])
        self._smoothing = float(document["smoothing"])
        self._alphabet = int(document["alphabet_size"])
        self.human = float(document["human"])
        self.threshold = float(document["threshold"])
        self.min_length = int(document["min_length"])

    @classmethod
    def load(cls, path: Path = _MODEL) -> NameModel:
        with gzip.open(path, "rt") as file:
            return cls(json.load(file))

    def surprise(self, label: str) -> float:
        """Mean negative log-probability per character (the end included): higher is less like people."""
        text = _START + _START + label + _END
        trigrams, pairs, bigrams, singles = self._trigrams, self._pairs, self._bigrams, self._singles
        weight, smoothing, alphabet = self._weight, self._smoothing, self._alphabet
        total = 0.0
        for at in range(2, len(text)):
            pair = pairs.get(text[at - 2 : at], 0)
            trigram = trigrams.get(text[at - 2 : at + 1], 0) / pair if pair else 0.0
            bigram = (bigrams.get(text[at - 1 : at + 1], 0) + smoothing) / (
                singles.get(text[at - 1], 0) + smoothing * alphabet
            )
            total -= math.log(weight * trigram + (1 - weight) * bigram)
        return total / (len(text) - 2)

    def score(self, label: str) -> float:
        """How far the label as a whole is from names people use: its surprise above a human's, summed over
        its characters (a long random label is surer to be random than a short one)."""
        return (len(label) + 1) * (self.surprise(label) - self.human)

    def judged(self, label: str) -> bool:
        """Whether a label can be judged: long enough to tell, letters only (labels with digits are mostly
        content hashes of CDNs and trackers, and punycode is another alphabet)."""
        return len(label) >= self.min_length and label.isascii() and label.isalpha()

    def generated(self, label: str) -> bool:
        """Whether a label looks machine-made."""
        return self.judged(label) and self.score(label) > self.threshold


def first_label(name: bytes) -> str:
    """The first label of a wire name, as text: of a registered domain (wire.registered_domain), the label it
    is registered under ("example" for example.co.uk)."""
    return name[1 : 1 + name[0]].decode("ascii", "replace") if name and name[0] else ""


def entropy(label: bytes) -> float:
    """Shannon entropy of a label's characters, in bits per character."""
    counts: dict[int, int] = {}
    for char in label:
        counts[char] = counts.get(char, 0) + 1
    size = len(label)
    return -sum(count / size * math.log2(count / size) for count in counts.values())


def _labels(name: bytes) -> list[bytes]:
    labels = []
    pos = 0
    while pos < len(name) and name[pos]:
        labels.append(name[pos + 1 : pos + 1 + name[pos]])
        pos += name[pos] + 1
    return labels


def _client_text(client: Hashable) -> str:
    """A client key as a person reads it: its address, and the identity options a router added, in hex."""
    if isinstance(client, tuple):
        address, identity = client
        return f"{address} ({identity.hex() if isinstance(identity, bytes) else identity})"
    return str(client)


class _Window:
    """What one client asked under one domain lately: distinct tunnel-like names and TXT queries, by time."""

    __slots__ = ("names", "seen", "txt")

    def __init__(self) -> None:
        self.names: deque[tuple[float, bytes]] = deque()  # (when, name) of the tunnel-like names, in order
        self.seen: set[bytes] = set()  # the same names, to count each once
        self.txt: deque[float] = deque()


class ThreatWatch:
    """Judges the names one worker's clients ask for; counts, logs and keeps the newest alerts."""

    def __init__(
        self,
        listed_categories: dict[int, str] | None = None,
        model: NameModel | None = None,
        max_tracked: int = 4096,
        recent: int = 100,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._wall_clock = wall_clock  # for the alerts' times; `now` everywhere else is monotonic
        self.listed_categories = listed_categories or {}  # category bit → its id, for names listed as threats
        self.model = model if model is not None else NameModel.load()
        self._windows: dict[tuple[Hashable, bytes], _Window] = {}
        self._max_tracked = max_tracked
        self._flagged: dict[tuple[Hashable, str, bytes], float] = {}
        self.recent: deque[Alert] = deque(maxlen=recent)  # the newest alerts, for the metrics
        self.unsent: deque[Alert] = deque(maxlen=1000)  # not yet handed to the admin process (worker/activity.py)
        self.counts: dict[str, int] = {}
        self._logged: deque[float] = deque()
        self._unlogged = 0

    def listed(self, client: Hashable, site: str | None, name: bytes, bits: int, now: float, device: str = "") -> None:
        """`client` asked for a name listed in a threat category (malware, phishing), whatever was answered."""
        domain = registered_domain(name)
        for mask, category in self.listed_categories.items():
            if bits & mask:
                self._flag(client, site, device, category, domain, name, now, f"listed as {category}")

    def bypass(self, client: Hashable, site: str | None, name: bytes, now: float, device: str = "") -> None:
        """`client` asked for a public encrypted DNS server (the encrypted-dns category) while its policy
        blocks them: it tried to send its DNS around the filter."""
        self._flag(client, site, device, "bypass", registered_domain(name), name, now, "tried to bypass the filter")

    def miss(self, client: Hashable, site: str | None, name: bytes, qtype: int, now: float, device: str = "") -> bool:
        """A name `client` asked for that no cache held: judge it. True if the name looks machine-made, so
        that the answer cached for it can say so to the next client that asks (`machine_made`)."""
        domain = registered_domain(name)
        label = first_label(domain)
        generated = self.model.generated(label)
        if generated:
            self._flag_machine_made(client, site, device, domain, label, name, now)
        if len(name) > len(domain):
            self._watch_tunnel(client, site, device, domain, name, qtype, now)
        return generated

    def machine_made(self, client: Hashable, site: str | None, name: bytes, now: float, device: str = "") -> None:
        """`client` asked for a name judged machine-made when another client's query put it in the cache: every
        device of a DGA family asks the same names."""
        domain = registered_domain(name)
        self._flag_machine_made(client, site, device, domain, first_label(domain), name, now)

    def _flag_machine_made(
        self, client: Hashable, site: str | None, device: str, domain: bytes, label: str, name: bytes, now: float
    ) -> None:
        self._flag(
            client, site, device, "dga", domain, name, now, f"machine-made name (score {self.model.score(label):.1f})"
        )

    def _watch_tunnel(
        self, client: Hashable, site: str | None, device: str, domain: bytes, name: bytes, qtype: int, now: float
    ) -> None:
        key = (client, domain)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._max_tracked:
                self._windows.clear()  # a flood of domains: start counting again rather than grow
            window = self._windows[key] = _Window()
        cutoff = now - _WINDOW
        names, seen = window.names, window.seen
        while names and names[0][0] < cutoff:
            seen.discard(names.popleft()[1])
        while window.txt and window.txt[0] < cutoff:
            window.txt.popleft()
        subdomain = name[: len(name) - len(domain)]
        if (
            len(names) < 2 * _TUNNEL_NAMES  # beyond, the tunnel is flagged already: nothing more to keep
            and name not in seen
            and any(len(label) >= _TUNNEL_LABEL and entropy(label) >= _TUNNEL_ENTROPY for label in _labels(subdomain))
        ):
            seen.add(name)
            names.append((now, name))
        if qtype == _TXT:
            window.txt.append(now)
        if len(window.names) >= _TUNNEL_NAMES:
            detail = f"{len(window.names)} long random names in {_WINDOW:.0f} s"
            self._flag(client, site, device, "tunnel", domain, name, now, detail)
        elif len(window.txt) >= _TXT_BURST:
            self._flag(
                client, site, device, "tunnel", domain, name, now, f"{len(window.txt)} TXT queries in {_WINDOW:.0f} s"
            )

    def _flag(
        self,
        client: Hashable,
        site: str | None,
        device: str,
        reason: str,
        domain: bytes,
        name: bytes,
        now: float,
        detail: str,
    ) -> None:
        key = (client, reason, domain)
        last = self._flagged.get(key)
        if last is not None and now - last < _REPEAT_AFTER:
            return
        if len(self._flagged) >= self._max_tracked:
            self._flagged.clear()
        self._flagged[key] = now
        self.counts[reason] = self.counts.get(reason, 0) + 1
        alert = Alert(self._wall_clock(), site, _client_text(client), device, name_to_text(name), reason, detail)
        self.recent.append(alert)
        self.unsent.append(alert)
        self._log(alert, now)

    def _log(self, alert: Alert, now: float) -> None:
        """At most `_LOG_LINES` lines a minute: a device trying thousands of names must not flood the log."""
        logged = self._logged
        while logged and logged[0] < now - 60:
            logged.popleft()
        if len(logged) >= _LOG_LINES:
            self._unlogged += 1
            return
        logged.append(now)
        more = f"; {self._unlogged} more not logged" if self._unlogged else ""
        self._unlogged = 0
        _log.warning(
            "threat: %s from %s (site %s): %s (%s)%s",
            alert.reason,
            alert.client,
            alert.site or "-",
            alert.name,
            alert.detail,
            more,
        )
