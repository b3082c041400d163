"""How commands print: JSON for scripts (`--json`: the documents as they are, times as the API gives them), and
for people tables and `key  value` lines, with every time in ISO 8601 (UTC)."""

from __future__ import annotations

import json
import math
from typing import Any

from resolver.shared.policy.model import time_document

# The fields the API gives as epoch seconds (and a dash where none: "never", "not yet").
TIMES = frozenset({"at", "valid_until", "published_at", "started_at", "expires", "first_seen", "last_seen"})


def show(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
        return
    value = readable(value)
    if isinstance(value, list):
        _list(value)
    elif isinstance(value, dict):
        _record(value)
    else:
        print(value)


def readable(value: Any, key: str = "") -> Any:
    """`value` with the epoch seconds of its time fields (at any depth) in ISO 8601, to the second."""
    if isinstance(value, dict):
        return {name: readable(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [readable(item) for item in value]
    if key in TIMES and isinstance(value, int | float) and not isinstance(value, bool):
        return time_document(float(int(value)) if math.isfinite(value) else value)
    return value


def _list(value: list[Any]) -> None:
    if not value:
        print("(none)")
    elif isinstance(value[0], dict):
        _table(value)
    else:
        for item in value:
            print(_cell(item))


def _record(value: dict[str, Any]) -> None:
    """A document's own fields as `key  value` lines, then each of its lists of records as a table."""
    tables = {key: item for key, item in value.items() if isinstance(item, list) and item and isinstance(item[0], dict)}
    width = max((len(key) for key in value if key not in tables), default=0)
    for key, item in value.items():
        if key not in tables:
            print(f"{key.ljust(width)}  {_cell(item)}")
    for key, rows in tables.items():
        print(f"\n{key}:")
        _table(rows)


def _table(value: list[dict[str, Any]]) -> None:
    columns = list(value[0])
    rows = [[_cell(row.get(column)) for column in columns] for row in value]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
