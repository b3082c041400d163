"""The machine-made-name detector (resolver/worker/threats.py): build its model, measure it.

    python -m bench.dga train --data ../shared/data     # writes resolver/worker/name_model.json.gz
    python -m bench.dga measure --data ../shared/data   # false positives on the top-100k, true positives on DGAs

The model is a character trigram model of the names people use: the labels of the Umbrella top-100k names
(what a resolver really sees). Its false positives are measured on those same names, so without ever
scoring a name with a model that saw it: the labels are split in two halves (by a hash of the label, so
www.x and x fall together), each half is scored by the model of the other, the threshold is the lowest that
flags at most 0.1 % of the names of the first half, and the names of the second half flagged at that
threshold are the false positives reported (target ≤ 0.1 %). True positives: names generated with the
published domain generation algorithms of two malware families, Ramnit and Necurs, scored by the model of
all 100k names at that threshold (target ≥ 90 %). Both generators are written here from the algorithms'
public descriptions (Johannes Bader's analyses).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gzip
import json
import math
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import DEFAULT_DATA, REPO, top_site_names
from resolver.shared.dns import text_to_name
from resolver.worker.threats import NameModel, first_label
from resolver.worker.wire import registered_domain

MODEL = REPO / "resolver" / "worker" / "name_model.json.gz"
ALPHABET_SIZE = 39  # a-z, 0-9, "-", the start and the end of a label
MIN_LENGTH = 7  # shorter labels are too few characters to tell people from machines
TRIGRAM_WEIGHT = 0.5
SMOOTHING = 0.5
HUMAN = 2.6  # bits of surprise per character a label may have and still count as people's
TARGET_RATE = 0.001
_MASK64 = (1 << 64) - 1
_NECURS_TLDS = [
    "tj",
    "in",
    "jp",
    "tw",
    "ac",
    "cm",
    "la",
    "mn",
    "so",
    "sh",
    "sc",
    "nu",
    "nf",
    "mu",
    "ms",
    "mx",
    "ki",
    "im",
    "cx",
    "cc",
    "tv",
    "bz",
    "me",
    "eu",
    "de",
    "ru",
    "co",
    "su",
    "pw",
    "kz",
    "sx",
    "us",
    "ug",
    "ir",
    "to",
    "ga",
    "com",
    "net",
    "org",
    "biz",
    "xxx",
    "pro",
    "bit",
]


def ramnit(seed: int, count: int) -> Iterator[str]:
    """Ramnit's DGA: a Park–Miller generator picks each name's length (8–19) and letters (a–y)."""
    value = seed

    def draw(modulus: int) -> int:
        nonlocal value
        value = (16807 * (value % 127773) - 2836 * (value // 127773)) & 0xFFFFFFFF
        return value % modulus

    for _ in range(count):
        first = value
        length = draw(12) + 8
        second = value
        label = "".join(chr(ord("a") + draw(25)) for _ in range(length))
        product = first * second
        value = (product + (product >> 32)) % 2**32
        yield label + ".com"


def _necurs_mix(value: int) -> int:
    for index in range((value & 0x7F) + 21):
        value = (value + (((value * 7) ^ (value << 15)) + 8 * index - (value >> 5))) & _MASK64
    return value


def necurs(day: datetime.date, sequence: int, magic: int = 9) -> str:
    """Necurs's DGA: 2,048 names a (four-day) period, 7–21 letters (a–y), one of 43 TLDs."""
    value = _necurs_mix(day.year)
    value = _necurs_mix(value + day.month + 43690)
    value = _necurs_mix(value + (day.day >> 2))
    value = _necurs_mix(value + sequence)
    value = _necurs_mix(value + magic)
    label = []
    for index in range(value % 15 + 7):
        value = _necurs_mix(value + index)
        label.append(chr(ord("a") + value % 25))
        value = _necurs_mix(value + 0xABBEDF)
    return "".join(label) + "." + _NECURS_TLDS[value % 43]


@functools.cache  # 24,000 names of pure-Python arithmetic: seconds, asked for by many tests and runs
def dga_names() -> dict[str, list[str]]:
    """Names of two families' generators (callers must not change the lists: they are shared)."""
    seeds = [0xEF214BBF, 0x28488EEA, 0x4BFCBC6A, 0x79159C10, 0x92F4BE35, 0x52278648]
    days = [datetime.date(2026, 11, 1) + datetime.timedelta(days=4 * step) for step in range(3)]
    return {
        "ramnit": [name for seed in seeds for name in ramnit(seed, 1000)],
        "necurs": [necurs(day, sequence) for day in days for sequence in range(2048)],
    }


def label_of(name: str) -> str:
    return first_label(registered_domain(text_to_name(name)))


def top_labels(data: Path) -> list[str]:
    return [label_of(name) for name in top_site_names(data, 100_000)]


def counts(labels: set[str]) -> dict[str, Any]:
    trigrams: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    bigrams: Counter[str] = Counter()
    singles: Counter[str] = Counter()
    for label in labels:
        text = "^^" + label + "$"
        for at in range(2, len(text)):
            trigrams[text[at - 2 : at + 1]] += 1
            pairs[text[at - 2 : at]] += 1
            bigrams[text[at - 1 : at + 1]] += 1
            singles[text[at - 1]] += 1
    return {
        "trigrams": dict(trigrams),
        "pairs": dict(pairs),
        "bigrams": dict(bigrams),
        "singles": dict(singles),
        "trigram_weight": TRIGRAM_WEIGHT,
        "smoothing": SMOOTHING,
        "alphabet_size": ALPHABET_SIZE,
        "human": HUMAN,
        "threshold": 0.0,
        "min_length": MIN_LENGTH,
    }


def cross_validated(labels: list[str]) -> tuple[float, float, float]:
    """(threshold, share of the first half's names flagged, share of the second half's names flagged), each
    name scored by the model of the half it is not in."""
    halves = [zlib.crc32(label.encode()) % 2 for label in labels]
    models = [
        NameModel(counts({label for label, half in zip(labels, halves, strict=True) if half == h})) for h in (0, 1)
    ]
    scores = [
        models[1 - half].score(label) if models[1 - half].judged(label) else -math.inf
        for label, half in zip(labels, halves, strict=True)
    ]
    first = sorted((score for score, half in zip(scores, halves, strict=True) if half == 0), reverse=True)
    allowed = int(len(first) * TARGET_RATE)
    threshold = max(first[allowed], 0.0)

    def rate(h: int) -> float:
        mine = [score for score, half in zip(scores, halves, strict=True) if half == h]
        return sum(score > threshold for score in mine) / len(mine)

    return threshold, rate(0), rate(1)


def train(data: Path) -> dict[str, Any]:
    labels = top_labels(data)
    threshold, _first, _second = cross_validated(labels)
    model = counts(set(labels))
    model["threshold"] = round(threshold, 2)
    return model


def measure(data: Path) -> dict[str, float]:
    labels = top_labels(data)
    threshold, first, second = cross_validated(labels)
    model = NameModel.load()
    results = {
        "threshold (cross-validated)": threshold,
        "top-100k, first half %": 100 * first,
        "top-100k, second half %": 100 * second,
        "top-100k, shipped model %": 100 * sum(model.generated(label) for label in labels) / len(labels),
    }
    for family, names in dga_names().items():
        results[f"{family} flagged %"] = 100 * sum(model.generated(label_of(name)) for name in names) / len(names)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["train", "measure"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if not (args.data / "blocklists").exists():
        parser.error(f"{args.data}: no blocklists there (this bench needs ../shared/data)")
    if args.action == "train":
        model = train(args.data)
        document = json.dumps(model, separators=(",", ":"), sort_keys=True).encode()
        MODEL.write_bytes(gzip.compress(document, compresslevel=9, mtime=0))
        print(f"wrote {MODEL} (threshold {model['threshold']}, {len(model['trigrams']):,} trigrams)")
        return 0
    for label, value in measure(args.data).items():
        print(f"{label:30} {value:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
