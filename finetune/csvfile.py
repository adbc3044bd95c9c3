"""CSV files that are safe to open in a spreadsheet.

File and class names come from the user (or from whoever made their zip). A cell that starts with
`=`, `+`, `-` or `@` is a formula to Excel, LibreOffice and Google Sheets (`=HYPERLINK(...)` sends
data away when clicked, DDE formulas can run programs), and a leading tab or carriage return can
hide such a start. As OWASP recommends, those text cells get a leading `'`, which spreadsheets
show as text. A spreadsheet set to another separator (`;` in German or French locales, a tab, `|`)
splits `a;=1+1.png` into `a` and the formula `=1+1.png`, so a formula start after any of those
separators (and spaces or quotes) gets its `'` too. Numbers the project formats itself are written
as numbers, never escaped.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

from .fsutil import write_text_atomic

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# a separator some spreadsheet may split on, then what would start a cell there as a formula
INNER_FORMULA = re.compile(r"([,;\t|][ \"]*)(?=[=+\-@\t\r])")


class Number(str):
    """A number formatted by us (e.g. "0.912345"): written as it is, never escaped."""


def number(value: float | int, spec: str = "") -> Number:
    return Number(format(value, spec))


def escape_cell(value):
    """The cell as a spreadsheet should see it: text that would start a formula gets a leading '."""
    if value is None:
        return ""
    if isinstance(value, (Number, bool, int, float)):
        return value
    text = INNER_FORMULA.sub(r"\1'", str(value))
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable]) -> Path:
    """Write a header and rows (UTF-8, one line per row), escaping every text cell; atomically, so a
    download or a second writer never sees half a file."""
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([escape_cell(cell) for cell in header])
    for row in rows:
        writer.writerow([escape_cell(cell) for cell in row])
    write_text_atomic(path, text.getvalue())
    return path
