"""The lists a worker serves: one immutable snapshot, swapped in one assignment when a new artifact appears.

A snapshot is a matcher plus the categories of the names looked up lately outside the query path (CNAME
targets, `why`: a dict keyed on the lowercased wire name), so a hot name costs one dict lookup instead of a
trie walk (~1.3 µs at 1 M names). The query path keeps a name's categories on its interned query, with the
snapshot they came from. Either memo belongs to its snapshot: a swap replaces the snapshot, so no answer
ever mixes two generations.

The watcher polls the artifact's path; when its identity (inode, size, mtime) changes, the new file is
copied into a private cache directory under its checksum, verified off the event loop (the SHA-256 of 10 MB
takes ~25 ms), checked against the catalogue, and swapped in. A corrupt, truncated, wrong-version or
inconsistent artifact is refused with a log line saying why and the old one keeps serving.

Workers never map the operator's path itself: a file overwritten in place (cp, scp, `cat >`) would change
the pages under a live mapping and crash the worker (SIGBUS). The private copy is named by its checksum
and renamed into place, so every worker maps the same inode and the page cache still holds one copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from blocklists.artifact import Artifact, open_artifact, verify_file
from blocklists.catalog import BUILT_IN_BIT, Catalog
from blocklists.errors import ArtifactError
from blocklists.matcher import Matcher
from resolver.shared.config import ListsSettings
from resolver.shared.errors import StartupError
from resolver.shared.memo import make_room
from resolver.shared.policy.decision import CANARIES

log = logging.getLogger(__name__)


_generations = itertools.count(1)


class ListSnapshot:
    __slots__ = ("_hot_size", "generation", "hot", "matcher")

    def __init__(self, matcher: Matcher, hot_size: int) -> None:
        self.matcher = matcher
        self.hot: dict[bytes, int] = {}
        self._hot_size = hot_size
        # What memos elsewhere (the interned queries') note instead of the snapshot itself: holding it would
        # keep a swapped-out list mapped.
        self.generation = next(_generations)

    @property
    def version(self) -> str:
        return self.matcher.version

    def categories(self, name: bytes) -> int:
        """Categories of a lowercased wire name: the hot dict, else the trie (remembered in the hot dict, the
        oldest half forgotten when full)."""
        bits = self.hot.get(name)
        if bits is None:
            bits = self.lookup(name)
            make_room(self.hot, self._hot_size)
            self.hot[name] = bits
        return bits

    def lookup(self, name: bytes) -> int:
        """Categories of a lowercased wire name: a trie walk, remembered nowhere (the query path memoises on
        the interned query instead), and the CANARY bit of a bypass canary, which no list holds."""
        return self.matcher.bits_of_wire(name) | CANARIES.get(name, 0)


def check_catalog(artifact: Artifact, catalog: Catalog) -> None:
    """The artifact's category bits must be the catalogue's: policies are bitmasks over the catalogue."""
    for category_id, info in artifact.header["categories"].items():
        if info.get("bit") == BUILT_IN_BIT:  # its names would be taken for bypass canaries
            raise ArtifactError(f"{artifact.path}: maps {category_id} to bit {BUILT_IN_BIT}, which is reserved")
        category = catalog.by_id.get(category_id)
        if category is not None and category.bit != info.get("bit"):
            raise ArtifactError(
                f"{artifact.path}: maps {category_id} to bit {info.get('bit')}, the catalogue to bit {category.bit}"
            )


_KEEP_COPIES = 3


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"bns-lists-{os.getuid()}"


def private_copy(path: Path, cache_dir: Path) -> Path:
    """The verified artifact at `path`, as `cache_dir/<checksum>.bns`. The cache entry is created once per
    content, only after it verifies, and never replaced: every worker maps the same inode."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cache_dir.stat().st_uid != os.getuid():
        raise ArtifactError(f"{cache_dir}: belongs to another user; set lists.cache_dir")
    checksum = verify_file(path)
    target = cache_dir / f"{checksum[:32]}.bns"
    if target.exists():
        return target
    temporary = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(path, temporary)
        with temporary.open("rb") as copied:
            os.fsync(copied.fileno())
        if verify_file(temporary) != checksum:
            raise ArtifactError(f"{path}: changed while it was copied; it will be read again when it settles")
        with contextlib.suppress(FileExistsError):  # a worker that raced us published the same content
            os.link(temporary, target)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot copy to {cache_dir}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    for old in sorted(cache_dir.glob("*.bns"), key=lambda p: p.stat().st_mtime)[:-_KEEP_COPIES]:
        old.unlink(missing_ok=True)  # a worker still mapping one keeps its pages until it lets go
    return target


def load_lists(path: Path, catalog: Catalog, cache_dir: Path) -> Artifact:
    artifact = open_artifact(private_copy(path, cache_dir), verify=False)  # verified on the way in
    check_catalog(artifact, catalog)
    return artifact


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def served_path(settings: ListsSettings) -> tuple[Path, bool]:
    """The artifact the workers serve, where published lists are installed too, and whether it must exist
    at start-up (one the admin named must; the default one appears when something is published)."""
    if settings.path:
        return Path(settings.path), True
    return cache_dir_of(settings) / "published.bns", False


def cache_dir_of(settings: ListsSettings) -> Path:
    return Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()


def usable_cache_dir(settings: ListsSettings) -> Path:
    """The node's cache directory, made (0700) if it is not there yet: this user's and writable, else a
    StartupError naming lists.cache_dir."""
    directory = cache_dir_of(settings)
    named = f"lists.cache_dir: {directory}{'' if settings.cache_dir else ' (the default)'}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_uid != os.getuid():
            raise StartupError(f"{named} belongs to another user; choose a directory of this one")
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise StartupError(f"{named} cannot be used: {exc.strerror}") from None
    return directory


def verified_link(settings: ListsSettings) -> Path:
    """Where the node keeps a link to the last list it verified for its served path. It outlives restarts
    (a node that finds its file corrupt when it starts serves this instead of nothing) and is out of reach
    of the cache's pruning (a subdirectory, and a hard link: the data stays while the link does)."""
    served, _required = served_path(settings)
    digest = hashlib.sha256(str(served.absolute()).encode()).hexdigest()[:16]
    return cache_dir_of(settings) / "verified" / f"{digest}.bns"


class Lists:
    """The current snapshot of one worker, and the task that keeps it up to date."""

    def __init__(
        self,
        path: Path | None,
        catalog: Catalog,
        hot_size: int,
        check_interval: float,
        cache_dir: Path | None = None,
        required: bool = True,
        verified: Path | None = None,
    ) -> None:
        """`verified`: the node's link to the last list any of its processes verified (`verified_link`). A
        process that finds the file corrupt or half rewritten serves that until the file is good again,
        rather than nothing; `fallback` then says why."""
        self.path = path
        self.catalog = catalog
        self._hot_size = hot_size
        self._interval = check_interval
        self._cache_dir = cache_dir or default_cache_dir()
        self._seen = _identity(path) if path else None
        self._verified = verified
        self.fallback: str | None = None  # why the last verified list is served instead of the file
        present = path is not None and (required or self._seen is not None)
        artifact = None
        if present:
            assert path is not None
            try:
                artifact = load_lists(path, catalog, self._cache_dir)
            except ArtifactError as exc:
                if verified is None or not verified.exists():
                    raise
                artifact = open_artifact(verified, verify=False)
                self._seen = None  # read the file again at the first check
                self.fallback = str(exc)
                log.error(
                    "lists: %s; SERVING THE LAST VERIFIED LIST (version %s, verified %s) until the file is good again",
                    exc,
                    artifact.version,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(verified.stat().st_mtime)),
                )
            else:
                self._remember(artifact)
        self.snapshot = ListSnapshot(Matcher(artifact), hot_size)
        self.swaps = 0

    def _still(self) -> str:
        """What this process keeps serving when a new list is refused, for a log line."""
        artifact = self.snapshot.matcher.artifact
        return f"still serving version {artifact.version}" if artifact is not None else "still serving no list"

    def describe(self) -> str:
        """What this process serves, for a log line: the file and its version, or why not that."""
        artifact = self.snapshot.matcher.artifact
        if artifact is None:
            return f"none yet ({self.path} is served once a list is published there)" if self.path else "none"
        if self.fallback is not None:
            return (
                f"version {artifact.version} ({artifact.names} names), the last list verified for {self.path}, "
                f"which is refused: {self.fallback}"
            )
        return f"{self.path}, version {artifact.version} ({artifact.names} names)"

    def retarget(self, path: Path, check_interval: float) -> None:
        """Serve the artifact at `path` from now on (SIGHUP), once it verifies; the old one serves till then."""
        if path != self.path:
            self.path, self._seen = path, None
        self._interval = check_interval

    def _remember(self, artifact: Artifact) -> None:
        """Point the node's link at a list just verified (a hard link: the copy's data outlives pruning)."""
        if self._verified is None:
            return
        temporary = self._verified.with_name(f".{self._verified.name}.{os.getpid()}.tmp")
        try:
            # Between two links of one file rename(2) does nothing, and would leave the temporary link
            # behind: the usual case, every process of a node verifying the list the link already names.
            if self._verified.exists() and self._verified.samefile(artifact.path):
                return
            self._verified.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary.unlink(missing_ok=True)
            os.link(artifact.path, temporary)
            os.replace(temporary, self._verified)
        except OSError as exc:
            log.warning("lists: cannot keep %s as the last verified list: %s", artifact.path, exc.strerror)
        finally:
            temporary.unlink(missing_ok=True)  # another process linked the same file in between

    async def watch(self) -> None:
        """Poll for a new artifact until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> None:
        """Swap in the artifact at `path` if it changed since the last look."""
        if self.path is None:
            return
        identity = _identity(self.path)
        if identity is None or identity == self._seen:
            return
        self._seen = identity
        try:
            await self.reload()
        except Exception:  # whatever a file can do to the loader, the watcher must live on
            log.exception("lists: loading %s failed; %s", self.path, self._still())

    async def reload(self) -> bool:
        """Verify and swap in the artifact at `path`; False (and the old one serving) if it is refused."""
        assert self.path is not None
        try:
            artifact = await asyncio.to_thread(load_lists, self.path, self.catalog, self._cache_dir)
        except ArtifactError as exc:
            log.error("lists: refused the new artifact: %s; %s", exc, self._still())
            return False
        old = self.snapshot.version
        self._remember(artifact)
        self.snapshot = ListSnapshot(Matcher(artifact), self._hot_size)
        self.fallback = None
        self.swaps += 1
        log.info("lists: now serving version %s (%d names), was %s", artifact.version, artifact.names, old)
        return True
