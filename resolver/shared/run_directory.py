"""A node's run directory: what its processes tell each other while it runs, removed when it stops.

    run-<pid>/lock             held (flock) by the supervisor and its children while they live
    run-<pid>/worker-<n>.json  each worker's counters and state, every second (metrics, /health)
    run-<pid>/config.pickle    the configuration after a SIGHUP, for the children to apply
    run-<pid>/lists.target     the list version the workers must serve before they answer (see Worker)
    run-<pid>/activity/        each worker's device activity, handed to the admin process (worker/activity.py)

A supervisor killed outright cannot remove its directory; the next one to start in the same cache directory
removes every run directory whose lock nobody holds, and the temporary files (`.<name>.<pid>.tmp`) that
processes no longer alive left in the cache directory and its subdirectories.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from blocklists.artifact import write_atomically

if TYPE_CHECKING:
    from resolver.shared.config import Config

log = logging.getLogger(__name__)

UNSET = object()  # `lists_target` while no target is set


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_file = path / "config.pickle"
        self.lists_target_file = path / "lists.target"
        self.activity = path / "activity"

    @classmethod
    def create(cls, parent: Path) -> RunDirectory:
        """This supervisor's directory under `parent`, locked; the ones killed supervisors left are removed."""
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in parent.glob("run-*"):
            if stale.name != f"run-{os.getpid()}" and not _held(stale):
                shutil.rmtree(stale, ignore_errors=True)
                log.info("removed %s, left by a bns serve that was killed", stale)
        _remove_orphaned_temporaries(parent)
        path = parent / f"run-{os.getpid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        lock = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)  # kept open (and inherited) until exit
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, config: Config) -> None:
        write_atomically(self.config_file, [pickle.dumps(config)])

    def read_config(self) -> Config:
        """The configuration the supervisor wrote (only it writes here: the file is trusted like the code)."""
        return pickle.loads(self.config_file.read_bytes())

    def set_lists_target(self, version: str | None) -> None:
        """The workers may answer once they serve `version` (None: any list, or none, will do)."""
        write_atomically(self.lists_target_file, [json.dumps({"version": version}).encode()])

    def lists_target(self) -> object:
        """The version set by `set_lists_target`, or `UNSET` while nothing is."""
        try:
            return json.loads(self.lists_target_file.read_bytes())["version"]
        except (OSError, ValueError, KeyError):
            return UNSET


def _alive(pid: str) -> bool:
    """Whether the process `pid` (text, as in a file name) lives; not a number: no."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove_orphaned_temporaries(parent: Path) -> None:
    """The temporary files (`.<name>.<pid>.tmp`, see write_atomically) of processes that died before they
    could remove them, in the cache directory and its subdirectories (not the run directories: removed whole)."""
    kept = [entry for entry in parent.iterdir() if entry.is_dir() and not entry.name.startswith("run-")]
    for directory in (parent, *kept):
        for temporary in directory.glob(".*.tmp"):
            pid = temporary.name.rsplit(".", 2)[-2]
            if pid != str(os.getpid()) and not _alive(pid):
                temporary.unlink(missing_ok=True)


def _held(directory: Path) -> bool:
    """Whether a live supervisor (or one of its children) holds the run directory."""
    try:
        descriptor = os.open(directory / "lock", os.O_RDWR)
    except OSError:  # no lock yet (being made) or ever (an older bns): alive if its process is
        return _alive(directory.name.removeprefix("run-"))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    return False
