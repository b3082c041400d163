"""bns: a filtering, caching DNS resolver with per-device policy.

Where the install compiled the hot path (resolver/build_backend.py), Python imports the compiled modules
first; with `BNS_PURE_PYTHON=1` in the environment, bns and its workers import the Python source instead,
which is how the fallback is run and tested on a machine that compiled it.
"""

import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from types import ModuleType

__version__ = "0.1.0"


class _SourceOnly(MetaPathFinder):
    """Finds bns's own modules as .py files only, never as compiled extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith(__name__ + ".") or path is None:
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(fullname, target)
            if spec is not None and spec.loader is not None:
                return spec
        return None


if os.environ.get("BNS_PURE_PYTHON"):
    sys.meta_path.insert(0, _SourceOnly())
