"""The hot path runs compiled where the install could compile it, and as the same Python where it could not
or where `BNS_PURE_PYTHON` says so (resolver/build_backend.py, resolver/__init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resolver.build_backend import HOT_PATH

pytestmark = pytest.mark.unit
MODULES = [path.removesuffix(".py").replace("/", ".") for path in HOT_PATH]
WHERE = (
    f"import json, importlib, resolver; print(json.dumps([importlib.import_module(m).__file__ for m in {MODULES!r}]))"
)


def module_files(pure: bool) -> list[str]:
    environment = {key: value for key, value in os.environ.items() if key != "BNS_PURE_PYTHON"}
    if pure:
        environment["BNS_PURE_PYTHON"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", WHERE], capture_output=True, text=True, env=environment, timeout=60, check=True
    )
    return json.loads(result.stdout)


def test_pure_python_imports_every_hot_path_module_from_its_source():
    assert all(path.endswith(".py") for path in module_files(pure=True))


def test_the_install_compiled_the_whole_hot_path_or_none_of_it():
    compiled = [not path.endswith(".py") for path in module_files(pure=False)]
    assert all(compiled) or not any(compiled), dict(zip(MODULES, compiled, strict=True))
    if os.environ.get("BNS_REQUIRE_COMPILED"):  # CI: a build that fell back to Python must not pass unseen
        assert all(compiled), "BNS_REQUIRE_COMPILED is set but the hot path runs as plain Python"


def test_no_compiled_module_is_older_than_its_source():
    """An editable install compiles in place: after a change to a hot-path module, its stale .so would run
    instead of the change (`pip install -e .` again, or run with BNS_PURE_PYTHON=1)."""
    stale = [
        path
        for path, compiled in zip(HOT_PATH, module_files(pure=False), strict=True)
        if not compiled.endswith(".py") and os.path.getmtime(compiled) < os.path.getmtime(compiled_source(path))
    ]
    assert not stale, f"rebuild (pip install -e .): {stale}"


def compiled_source(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), path)
