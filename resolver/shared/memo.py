"""Bounded memos: a dict that forgets its oldest half when full.

Emptying a memo when it fills is a cliff: a working set a little larger than the memo misses on every
lookup (each insert clears what the next query needs). Dropping the oldest half keeps the newer half, and
costs one pass over half the entries per half-a-memo of inserts, the same on average as inserting."""

from __future__ import annotations

from itertools import islice
from typing import Any


def make_room(memo: dict[Any, Any], size: int) -> None:
    """Before an insert into `memo` (bounded to `size`): if it is full, drop its oldest half."""
    if len(memo) >= size:
        for key in list(islice(memo, max(size // 2, 1))):
            del memo[key]
