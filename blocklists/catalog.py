"""The category catalogue: which bit each category has in compiled lists, and what a policy does by default."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from blocklists.errors import CatalogError

MAX_BITS = 64
# Not a category's: the resolver gives it to the names it knows without a list (its policy's built-in names,
# resolver/shared/policy/decision.py). Below 62: compiled, a query's categories stay a machine word.
BUILT_IN_BIT = 61
ACTIONS = ("block", "warn")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class Category:
    id: str
    bit: int
    title: str
    description: str
    action: str  # "block" (Content Control) or "warn" (Web Protect)

    @property
    def mask(self) -> int:
        return 1 << self.bit


class Catalog:
    """Categories by id and by bit."""

    def __init__(self, categories: list[Category]) -> None:
        self.categories = sorted(categories, key=lambda category: category.bit)
        self.by_id = {category.id: category for category in self.categories}
        self.by_bit = {category.bit: category for category in self.categories}

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self.by_id

    def mask(self, category_ids: list[str] | tuple[str, ...]) -> int:
        mask = 0
        for category_id in category_ids:
            mask |= self.by_id[category_id].mask
        return mask

    def default_mask(self, action: str) -> int:
        return self.mask([category.id for category in self.categories if category.action == action])

    def ids(self, mask: int) -> list[str]:
        """The ids of the categories in `mask`, in bit order (unknown bits are named `bit-N`)."""
        names = []
        bit = 0
        while mask:
            if mask & 1:
                category = self.by_bit.get(bit)
                names.append(category.id if category else f"bit-{bit}")
            mask >>= 1
            bit += 1
        return names

    def bits(self) -> dict[str, int]:
        return {category.id: category.bit for category in self.categories}


def load_catalog(path: Path | None = None) -> Catalog:
    """The packaged catalogue, or the one at `path`. Raises CatalogError naming the entry and field at fault."""
    if path is None:
        text = resources.files("blocklists").joinpath("categories.toml").read_text(encoding="utf-8")
        where = "categories.toml (packaged)"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
        where = str(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{where}: not valid TOML: {exc}") from None
    if table.get("format") != 1:
        raise CatalogError(f"{where}: format: expected 1, got {table.get('format')!r}")
    entries = table.get("category")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{where}: no [[category]] entries")
    extends = table.get("extends")
    if extends is not None:
        # An operator's own categories (ads and trackers…) beside the packaged ones, whose bits they keep.
        if extends != "packaged" or path is None:
            raise CatalogError(f'{where}: extends: the only catalogue to extend is "packaged"')
        packaged = resources.files("blocklists").joinpath("categories.toml").read_text(encoding="utf-8")
        entries = tomllib.loads(packaged)["category"] + entries
    categories: list[Category] = []
    seen_bits: dict[int, str] = {}
    for index, entry in enumerate(entries, 1):
        categories.append(_category(entry, f"{where}: category #{index}", seen_bits))
    if len({category.id for category in categories}) != len(categories):
        duplicates = sorted({c.id for c in categories if [d.id for d in categories].count(c.id) > 1})
        raise CatalogError(f"{where}: duplicate category id {', '.join(duplicates)}")
    return Catalog(categories)


def _category(entry: object, where: str, seen_bits: dict[int, str]) -> Category:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a table")
    unknown = set(entry) - {"id", "bit", "title", "description", "action"}
    if unknown:
        raise CatalogError(f"{where}: unknown field {', '.join(sorted(unknown))}")
    for field, kind in (("id", str), ("bit", int), ("title", str), ("description", str), ("action", str)):
        if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
            raise CatalogError(f"{where}: {field}: missing or not a {kind.__name__}")
    category_id, bit, action = entry["id"], entry["bit"], entry["action"]
    where = f"{where} ({category_id})"
    if not category_id or not set(category_id) <= _ID_CHARS:
        raise CatalogError(f"{where}: id: use lowercase letters, digits, '-' and '_'")
    if not 0 <= bit < MAX_BITS:
        raise CatalogError(f"{where}: bit: {bit} is outside 0..{MAX_BITS - 1}")
    if bit == BUILT_IN_BIT:
        raise CatalogError(f"{where}: bit: {bit} is reserved for the resolver's built-in names; choose another")
    if bit in seen_bits:
        raise CatalogError(f"{where}: bit: {bit} is already used by {seen_bits[bit]}")
    seen_bits[bit] = category_id
    if action not in ACTIONS:
        raise CatalogError(f"{where}: action: {action!r} is not one of {', '.join(ACTIONS)}")
    return Category(category_id, bit, entry["title"], entry["description"], action)
