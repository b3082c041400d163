"""bns: a filtering, caching DNS resolver with per-device policy."""

__version__ = "0.1.0"
