"""Safe search: the names that search engines document for forcing it, by DNS.

A policy with safe search answers a search engine's name with a CNAME to the engine's restrict name plus
that name's addresses (resolved like any other name), so the browser reaches the filtered service:

- Google: `www.google.<tld>` and `google.<tld>` → `forcesafesearch.google.com` (Google's "Lock SafeSearch
  for devices & networks you manage").
- YouTube: `www.youtube.com`, `m.youtube.com`, `youtubei.googleapis.com`, `youtube.googleapis.com`,
  `www.youtube-nocookie.com` → `restrict.youtube.com` (strict restricted mode).
- Bing: `www.bing.com`, `bing.com` → `strict.bing.com`.
- DuckDuckGo: `duckduckgo.com`, `www.duckduckgo.com`, `start.duckduckgo.com` → `safe.duckduckgo.com`.
"""

from __future__ import annotations

from resolver.shared.dns import text_to_name

_GOOGLE_RESTRICT = text_to_name("forcesafesearch.google.com")
_EXACT = {
    text_to_name(name): text_to_name(target)
    for names, target in (
        (
            (
                "www.youtube.com",
                "m.youtube.com",
                "youtubei.googleapis.com",
                "youtube.googleapis.com",
                "www.youtube-nocookie.com",
            ),
            "restrict.youtube.com",
        ),
        (("www.bing.com", "bing.com"), "strict.bing.com"),
        (("duckduckgo.com", "www.duckduckgo.com", "start.duckduckgo.com"), "safe.duckduckgo.com"),
    )
    for name in names
}
_GOOGLE = b"\x06google"
# Google's search domains: google.<tld>, google.co.<cc>, google.com.<cc>; not googleapis, not mail.google.com.
_GOOGLE_SECOND_LEVEL = (b"\x02co", b"\x03com")


def restrict_name(name: bytes) -> bytes | None:
    """The restrict name a lowercased wire name must be answered with, or None."""
    target = _EXACT.get(name)
    if target is not None:
        return target
    rest = name[4:] if name.startswith(b"\x03www") else name
    if not rest.startswith(_GOOGLE) or rest == _GOOGLE_RESTRICT:
        return None
    labels = []
    pos = len(_GOOGLE)
    while rest[pos]:
        labels.append(rest[pos : pos + 1 + rest[pos]])
        pos += rest[pos] + 1
    if len(labels) == 1 or (len(labels) == 2 and labels[0] in _GOOGLE_SECOND_LEVEL):
        return _GOOGLE_RESTRICT
    return None
