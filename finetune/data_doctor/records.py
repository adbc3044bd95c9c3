"""The images the doctor looks at: each one's path, split and label, in a scan's order (train, val, test)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..data import DatasetScan

SPLITS = ("train", "val", "test")

Log = Callable[[str], None]


def quiet(message: str) -> None:
    pass


@dataclass
class Record:
    path: str  # relative to the data root
    split: str
    label: int


def records_of(scan: DatasetScan) -> list[Record]:
    return [Record(rel, split, label) for split in SPLITS for rel, label in getattr(scan, split)]
