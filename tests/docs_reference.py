"""The parts of docs/ made from the code, so that they say what the code does: the settings' table in
docs/configuration.md (from `describe_settings`), the admin API's routes in docs/admin-api.md and
docs/openapi.json (from the route table the server routes and serves `/openapi.json` with).

`python -m tests.docs_reference` remakes them; tests/test_docs.py fails while any is stale. A generated part of
a Markdown file lies between `<!-- begin generated: NAME … -->` and `<!-- end generated: NAME -->`; the text
around it is written by hand.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from resolver.admin.api import ROUTES, openapi_document
from resolver.shared.config import describe_settings

ROOT = Path(__file__).resolve().parents[1]
REMAKE = "python -m tests.docs_reference"


def toml_value(value: object) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe_settings():
        value = ast.literal_eval(default)  # describe_settings gives each default as a Python literal
        shown = "–" if value is None else f"`{toml_value(value)}`"
        rows.append(f"| `{key}` | {cell(shown)} | {cell(doc)} |")
    return "\n".join(rows)


def routes_table() -> str:
    rows = ["| method | path | role | site token | what |", "|---|---|---|---|---|"]
    for route in ROUTES:
        subscriber = "yes" if route.subscriber else ""
        rows.append(f"| {route.method} | `{route.path}` | {route.role} | {subscriber} | {cell(route.summary)} |")
    return "\n".join(rows)


def openapi_text() -> str:
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


# (file, part name) → what the part holds
PARTS: dict[tuple[str, str], Callable[[], str]] = {
    ("docs/configuration.md", "settings"): settings_table,
    ("docs/admin-api.md", "routes"): routes_table,
}
# file → its whole text
WHOLE: dict[str, Callable[[], str]] = {"docs/openapi.json": openapi_text}


def _part(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- begin generated: {name}\b[^>]*-->\n)(?:.*?\n)?(<!-- end generated: {name} -->)", re.DOTALL
    )


def remade(path: str, text: str | None = None) -> str:
    """What the file at `path` (relative to the checkout) should hold now; `text`: its text, if not the file's."""
    if path in WHOLE:
        return WHOLE[path]()
    text = (ROOT / path).read_text() if text is None else text
    for (file, name), make in PARTS.items():
        if file == path:
            found = _part(name).search(text)
            if found is None:
                raise LookupError(f"{path}: no generated part {name!r} (its begin and end markers)")
            text = text[: found.end(1)] + make() + "\n" + text[found.start(2) :]
    return text


def generated_files() -> list[str]:
    return sorted({file for file, _ in PARTS} | set(WHOLE))


def main() -> int:
    for path in generated_files():
        made = remade(path)
        target = ROOT / path
        if not target.exists() or target.read_text() != made:
            target.write_text(made)
            print(f"remade {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
