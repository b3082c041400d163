"""pip's build backend for bns: setuptools, plus the worker's hot path compiled with mypyc when it can be.

The compiled modules are the same typed Python modules run as C; the package keeps them as Python too. Wherever
compiling fails (no C compiler, no Python headers, mypyc refusing a module) the install goes on as plain
Python and says so. `BNS_PURE_PYTHON=1` at install time skips compiling; at run time it makes bns ignore the
compiled modules (resolver/__init__.py), which is how the tests run the fallback as well.

Named in pyproject.toml (`build-backend`, with `backend-path`); bns never imports it while running.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.build_meta import _BuildMetaBackend
from setuptools.command.build_ext import build_ext

# The modules every query passes through (docs/architecture.md, "The compiled hot path").
HOT_PATH = [
    "resolver/shared/dns.py",
    "resolver/shared/identity.py",
    "resolver/shared/lists.py",
    "resolver/shared/policy/decision.py",
    "resolver/shared/policy/safesearch.py",
    "resolver/worker/access.py",
    "resolver/worker/activity.py",
    "resolver/worker/alarms.py",
    "resolver/worker/answers.py",
    "resolver/worker/cache.py",
    "resolver/worker/directory.py",
    "resolver/worker/dot.py",  # a subclass of listener.py's TcpConnection: a compiled class takes no other
    "resolver/worker/listener.py",
    "resolver/worker/local_zones.py",
    "resolver/worker/pipeline.py",
    "resolver/worker/rate_limit.py",
    "resolver/worker/threats.py",
    "resolver/worker/tls_transport.py",
    "resolver/worker/upstream.py",
    "resolver/worker/wire.py",
]
_BUILDING = {"bdist_wheel", "editable_wheel", "build_ext", "build", "install"}  # not metadata-only commands


def say(message: str) -> None:
    print(f"bns: {message}", file=sys.stderr)


class BuildOrFallBack(build_ext):
    """build_ext that, when any module fails to compile, removes what it did build: the compiled modules
    share one library, so a partial build would not import."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # a compiler fails in many classes of error; each means "plain Python"
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            say(f"the hot path was not compiled ({error}); bns runs as plain Python, slower per query")


def hot_path_extensions() -> list[Any]:
    if not _BUILDING.intersection(sys.argv):
        return []
    if os.environ.get("BNS_PURE_PYTHON"):
        return plain_python("BNS_PURE_PYTHON is set: the hot path is not compiled")
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 (only when building, and it may be missing)
    except ImportError:
        return plain_python("mypyc is not installed: the hot path is not compiled")
    try:
        # Third-party packages are not in pip's build environment: to mypyc their types are Any.
        return list(mypycify(["--ignore-missing-imports", *HOT_PATH], opt_level="3", group_name="bns_hot_path"))
    except (Exception, SystemExit) as error:  # mypy exits when a module does not type-check
        return plain_python(f"mypyc could not compile the hot path ({error}); bns runs as plain Python")


def plain_python(why: str) -> list[Any]:
    """No extensions, and none left from an earlier editable build in the source tree either: Python would
    import those before the modules' source."""
    say(why)
    for path in HOT_PATH:
        for stale in Path(path).parent.glob(Path(path).stem + ".*.so"):
            stale.unlink()
    for stale in Path().glob("bns_hot_path__mypyc.*.so"):
        stale.unlink()
    return []


class _Backend(_BuildMetaBackend):
    def run_setup(self, setup_script: str = "setup.py") -> None:
        setup(ext_modules=hot_path_extensions(), cmdclass={"build_ext": BuildOrFallBack})


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_wheel = _BACKEND.build_wheel
build_sdist = _BACKEND.build_sdist
build_editable = _BACKEND.build_editable
