"""HICH-IT-style files: one "char TAG" per line, a blank line between documents (BIO or BIOES).

HICH-IT (arXiv 2401.15934) annotates Chinese EMR text character by character with B-/I-/E-/S-LOC
and O. We read any type names (so files with our finer types work too) and write either our types
or, with ``collapse_to="LOC"``, HICH-IT's single type. A space character is written as a line
that starts with the space (``"  O"``); line breaks inside a text are written as spaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from models.ner.document import Document, guess_lang
from models.ner.tags import Span, spans_to_tags, tags_to_spans


class HichitFormatError(ValueError):
    """A line that is not "char TAG"; the message names the line number."""


def parse_hichit(text: str, *, source: str = "<text>") -> list[Document]:
    docs: list[Document] = []
    chars: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if chars:
            doc_text = "".join(chars)
            try:
                spans = tags_to_spans(tags)
            except ValueError as exc:
                raise HichitFormatError(f"{source}: document {len(docs) + 1}: {exc}") from exc
            docs.append(Document(doc_text, spans, guess_lang(doc_text)))
        chars.clear()
        tags.clear()

    for lineno, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            flush()
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 1:
            # Only a tag: the character was a space (written as " TAG" / "  TAG").
            if not line[:1].isspace():
                raise HichitFormatError(f"{source}:{lineno}: expected 'char TAG', got one field")
            char, tag = " ", parts[0]
        else:
            char, tag = parts
            if len(char) != 1:
                char = char.strip() or " "
                if len(char) != 1:
                    raise HichitFormatError(f"{source}:{lineno}: expected one character before the tag")
        chars.append(char)
        tags.append(tag)
    flush()
    return docs


def read_hichit(path: Path | str) -> list[Document]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HichitFormatError(f"{path}: not UTF-8 text") from exc
    return parse_hichit(text, source=str(path))


def format_hichit(docs: Iterable[Document], *, scheme: str = "BIOES",
                  collapse_to: str | None = None) -> str:
    out: list[str] = []
    for doc in docs:
        spans = doc.spans if collapse_to is None else [Span(s.start, s.end, collapse_to)
                                                       for s in doc.spans]
        tags = spans_to_tags(len(doc.text), spans, scheme)
        for char, tag in zip(doc.text, tags):
            char = " " if char.isspace() else char
            out.append(f"{char} {tag}")
        out.append("")
    return "\n".join(out) + ("\n" if out else "")


def write_hichit(docs: Iterable[Document], path: Path | str, *, scheme: str = "BIOES",
                 collapse_to: str | None = None) -> None:
    Path(path).write_text(format_hichit(docs, scheme=scheme, collapse_to=collapse_to),
                          encoding="utf-8")
