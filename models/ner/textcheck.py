"""Is this input a usable clinical text? Light (no torch) so the HL7 listener can use it."""

from __future__ import annotations

import unicodedata

MAX_CHARS = 20_000  # a long discharge letter; anything larger is not one note


class NerInputError(ValueError):
    """Input that is not a usable clinical text; the message says why (never the text itself)."""


def check_text(data: bytes | str, *, max_chars: int = MAX_CHARS) -> str:
    """The text to analyse, or NerInputError for empty, binary or oversize input."""
    if isinstance(data, bytes):
        if len(data) > max_chars * 4:
            raise NerInputError(f"input too large: {len(data)} bytes (limit {max_chars * 4})")
        if b"\x00" in data:
            raise NerInputError("binary input (NUL bytes): expected UTF-8 or GB18030 text")
        for encoding in ("utf-8-sig", "gb18030"):
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        else:
            raise NerInputError("binary input: not UTF-8 or GB18030 text")
    else:
        text = data
    if not text.strip():
        raise NerInputError("empty text")
    if len(text) > max_chars:
        raise NerInputError(f"text too long: {len(text)} characters (limit {max_chars})")
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v")
    if "\x00" in text or controls > max(2, len(text) // 100):
        raise NerInputError("binary input: too many control characters for text")
    return text
