"""Entity types and tag schemes (BIO for the model, BIOES for HICH-IT files), span <-> tag conversion.

A span is a half-open character range ``[start, end)`` with a type. Tags are per character
(HICH-IT files) or per token (the model); both are converted through spans so that the
tokenizer never decides what an entity is.
"""

from __future__ import annotations

from dataclasses import dataclass

# The finer entity set that triage uses (design §5). Order = label ids of the demo model.
ENTITY_TYPES: dict[str, str] = {
    "AGE": "patient age (\"67-year-old\", \"67岁\")",
    "SEX": "patient sex (\"male\", \"F\", \"女性\")",
    "ONSET": "time since symptom onset (\"2 hours ago\", \"3小时\")",
    "SYMPTOM": "presenting symptom (\"headache\", \"左侧肢体无力\")",
    "GCS": "Glasgow Coma Scale with its value (\"GCS 13\", \"GCS评分9分\")",
    "BP": "blood pressure with its value (\"BP 185/100 mmHg\", \"血压180/100mmHg\")",
    "DRUG": "anticoagulant or antiplatelet drug (\"warfarin\", \"阿司匹林\")",
    "HTN": "hypertension history (\"HTN\", \"高血压\")",
    "HEM_LOC": "hemorrhage location (\"left basal ganglia\", \"右侧丘脑\")",
    "HEM_VOL": "hemorrhage volume (\"25 mL\", \"约30ml\")",
}
# HICH-IT marks all key clinical content with one type.
HICHIT_TYPE = "LOC"
SCHEMES = ("BIO", "BIOES")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


def spans_to_tags(length: int, spans: list[Span], scheme: str = "BIO") -> list[str]:
    """Per-position tags for ``length`` positions; overlapping spans: the first one wins."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r} (use one of {', '.join(SCHEMES)})")
    tags = ["O"] * length
    for sp in sorted(spans, key=lambda s: (s.start, -s.end)):
        if sp.start < 0 or sp.end > length or sp.start >= sp.end:
            raise ValueError(f"span {sp} outside 0..{length}")
        if any(t != "O" for t in tags[sp.start:sp.end]):
            continue
        if scheme == "BIOES" and sp.end - sp.start == 1:
            tags[sp.start] = f"S-{sp.type}"
            continue
        tags[sp.start] = f"B-{sp.type}"
        for i in range(sp.start + 1, sp.end):
            tags[i] = f"I-{sp.type}"
        if scheme == "BIOES":
            tags[sp.end - 1] = f"E-{sp.type}"
    return tags


def split_tag(tag: str) -> tuple[str, str | None]:
    """'B-LOC' -> ('B', 'LOC'); 'O' -> ('O', None). Accepts '-' or '_' separators."""
    if tag == "O" or not tag:
        return "O", None
    for sep in ("-", "_"):
        if len(tag) > 2 and tag[1] == sep:
            prefix = tag[0].upper()
            if prefix in "BIESLMU":
                # BILOU/BMES spellings map onto BIOES.
                prefix = {"L": "E", "U": "S", "M": "I"}.get(prefix, prefix)
                return prefix, tag[2:]
    raise ValueError(f"not a BIO/BIOES tag: {tag!r}")


def tags_to_spans(tags: list[str]) -> list[Span]:
    """Spans from BIO or BIOES tags (lenient: an I-/E- without a matching opener starts a span)."""
    spans: list[Span] = []
    start, cur = None, None

    def close(end: int) -> None:
        nonlocal start, cur
        if cur is not None:
            spans.append(Span(start, end, cur))
        start, cur = None, None

    for i, tag in enumerate(tags):
        prefix, typ = split_tag(tag)
        if prefix == "O":
            close(i)
        elif prefix in ("B", "S") or typ != cur:
            close(i)
            start, cur = i, typ
            if prefix == "S":
                close(i + 1)
        if prefix == "E":
            close(i + 1)
    close(len(tags))
    return spans
