"""The layout's promise, read from the imports (ast, every one, lazy ones in functions included): each file
imports only from its own layer's package or from layers below it, the DNS worker and the admin process never
import each other, and no module imports itself back through others.

    resolver.cli          the command line (on top: it may start a node)
    resolver.supervisor   binds sockets, starts and watches the processes
    resolver.worker       the DNS worker's query path      } siblings
    resolver.admin        the admin process                }
    resolver.shared       below both: config, lists, policy, stores
    blocklists            the library: no network, no asyncio, nothing of resolver
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "blocklists": 0,
    "resolver.shared": 1,
    "resolver.worker": 2,
    "resolver.admin": 2,
    "resolver.supervisor": 3,
    "resolver.cli": 4,
    "resolver": 5,  # __init__ and __main__
}


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    return max((package for package in LAYERS if module == package or module.startswith(package + ".")), key=len)


def imports() -> dict[str, set[str]]:
    """module → the modules of this project it imports."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("resolver/**/*.py"), *ROOT.glob("blocklists/**/*.py")]:
        module = module_of(path)
        targets = found.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("resolver", "blocklists") and (
                    ROOT.joinpath(*name.split(".")).with_suffix(".py").exists()
                    or ROOT.joinpath(*name.split("."), "__init__.py").exists()
                ):
                    targets.add(name)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from its own layer or above, other than from its own package."""
    wrong = []
    for module, targets in graph.items():
        mine = package_of(module)
        for target in targets:
            theirs = package_of(target)
            if theirs != mine and target != "resolver" and LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{module} imports {target} ({theirs} is not below {mine})")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[str]:
    found = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target == module:
                continue  # a package's __init__ naming its own submodules
            if target in path:
                found.append(" → ".join([*path[path.index(target) :], target]))
            elif target not in done:
                visit(target, [*path, target], done)
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module], done)
    return found


def test_no_import_reaches_up_a_layer_or_across_to_a_sibling():
    assert upward(imports()) == []


def test_no_import_circle():
    assert circles(imports()) == []


def test_the_checks_catch_what_they_are_for():
    planted = {
        "resolver.shared.lists": {"resolver.worker.pipeline"},  # up a layer
        "resolver.admin.why": {"resolver.worker.directory"},  # across to a sibling
        "resolver.worker.cache": {"resolver.worker.wire"},
        "resolver.worker.wire": {"resolver.worker.cache"},  # a circle
        "blocklists.names": {"resolver.shared.dns"},  # the library reaching into resolver
    }
    assert len(upward(planted)) == 3
    assert circles(planted) == ["resolver.worker.cache → resolver.worker.wire → resolver.worker.cache"]
