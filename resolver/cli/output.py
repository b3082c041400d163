"""How commands print: JSON for scripts (`--json`), tables and `key  value` lines for people."""

from __future__ import annotations

import json
from typing import Any


def show(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, sort_keys=True))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        columns = list(value[0])
        rows = [[_cell(row.get(column)) for column in columns] for row in value]
        widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
        print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)))
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    elif isinstance(value, list):
        for item in value:
            print(_cell(item))
    elif isinstance(value, dict):
        width = max((len(key) for key in value), default=0)
        for key, item in value.items():
            print(f"{key.ljust(width)}  {_cell(item)}")
    else:
        print(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)
