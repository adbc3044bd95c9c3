"""File and folder names that are unsafe to use or to show as they are.

A name may hold characters a terminal or a browser acts on instead of showing: control characters
(newline, tab, ESC starting an ANSI sequence such as "\\x1b[2J", which clears the screen) and the
Unicode bidirectional controls, which reorder what is displayed ("cat\\u202egpj.exe" shows as
"catexe.jpg"). Names from an archive or a folder holding them are refused or skipped
(`unsafe_name_reason`), and any name shown to the user goes through `printable`.
"""

from __future__ import annotations

import unicodedata

# Bidirectional formatting characters (Unicode's Bidi_Control property): embeddings and overrides
# U+202A-U+202E, isolates U+2066-U+2069, and the marks LRM, RLM and ALM.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
# Line and paragraph separators break lines in some renderers; lone surrogates are undecodable bytes
# in a file name (os.fsdecode's surrogateescape) and cannot be written as UTF-8.
_ESCAPED_TOO = frozenset("\u2028\u2029")


def _needs_escape(char: str) -> bool:
    return char in BIDI_CONTROLS or char in _ESCAPED_TOO or unicodedata.category(char) in ("Cc", "Cs")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control, bidirectional-control, line-separator and lone-surrogate character
    replaced by its escape (\\x1b, \\u202e, \\udcff), so it can be shown on one line exactly as it is
    named; other text, accents and non-Latin scripts included, is unchanged."""
    text = str(text)
    if not any(_needs_escape(c) for c in text):
        return text
    return "".join(_escape(c) if _needs_escape(c) else c for c in text)


def unsafe_name_reason(name: str) -> str | None:
    """Why a file or folder name is refused (a short reason), or None when it is fine."""
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc":
            return "name contains control characters"
        if char in BIDI_CONTROLS:
            return "name contains bidirectional control characters"
        if category == "Cs":
            return "name is not valid UTF-8"
    return None
