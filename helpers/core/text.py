"""Text from files shown on a terminal: control characters and lone surrogates escaped."""

from __future__ import annotations

import unicodedata

# the bidirectional overrides and isolates: they reorder what a terminal shows after them
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def shown(text: str) -> str:
    """`text` safe to print: control characters (ANSI escapes, bells, carriage returns),
    bidirectional overrides and lone surrogates as backslash escapes; all else as it is."""
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if (0xD800 <= ord(char) <= 0xDFFF or char in BIDI
                       or unicodedata.category(char) in ("Cc", "Zl", "Zp")) else char
                   for char in text)
