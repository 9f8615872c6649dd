"""A labelled or predicted text: the unit that the generator, file readers, model and metrics share."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.ner.tags import Span


@dataclass
class Document:
    text: str
    spans: list[Span] = field(default_factory=list)
    lang: str = "und"  # en, zh, or und (unknown: e.g. read from a HICH-IT file)
    # Ground truth of the generator (span -> negated/uncertain), used to check the cue rules.
    negated: set[Span] = field(default_factory=set)
    uncertain: set[Span] = field(default_factory=set)


def guess_lang(text: str) -> str:
    """'zh' when CJK characters dominate the letters, else 'en'."""
    cjk = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    latin = sum(1 for c in text if c.isascii() and c.isalpha())
    return "zh" if cjk >= latin / 4 and cjk > 0 else "en"
