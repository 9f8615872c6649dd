"""Tag schemes and HICH-IT files: conversions must round-trip exactly."""

from __future__ import annotations

import pytest

from models.ner.hichit import HichitFormatError, format_hichit, parse_hichit, read_hichit, write_hichit
from models.ner.synth import generate
from models.ner.tags import Span, spans_to_tags, tags_to_spans

# Shaped like HICH-IT's published sample (Fig. 1): one character and its BIOES tag per line.
HICHIT_SAMPLE = """患 O
者 O
男 S-LOC
， O
6 B-LOC
7 I-LOC
岁 E-LOC
， O
头 B-LOC
痛 I-LOC
3 I-LOC
小 I-LOC
时 E-LOC
。 O

否 O
认 O
高 B-LOC
血 I-LOC
压 E-LOC
"""


@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_tags_round_trip_on_synthetic_notes(scheme):
    for doc in generate(200, 5):
        tags = spans_to_tags(len(doc.text), doc.spans, scheme)
        assert tags_to_spans(tags) == sorted(doc.spans, key=lambda s: s.start)


def test_bioes_marks_single_and_end():
    tags = spans_to_tags(6, [Span(0, 1, "SEX"), Span(2, 5, "AGE")], "BIOES")
    assert tags == ["S-SEX", "O", "B-AGE", "I-AGE", "E-AGE", "O"]


def test_lenient_decoding_of_stray_inside_tags():
    assert tags_to_spans(["O", "I-X", "I-X", "B-Y", "E-Y", "I-X"]) == [
        Span(1, 3, "X"), Span(3, 5, "Y"), Span(5, 6, "X")]


def test_unknown_scheme_and_tags_are_errors():
    with pytest.raises(ValueError):
        spans_to_tags(3, [], "IOB3")
    with pytest.raises(ValueError):
        tags_to_spans(["LOC"])


def test_reads_hichit_sample():
    docs = parse_hichit(HICHIT_SAMPLE)
    assert [d.text for d in docs] == ["患者男，67岁，头痛3小时。", "否认高血压"]
    first = docs[0]
    assert [first.text[s.start:s.end] for s in first.spans] == ["男", "67岁", "头痛3小时"]
    assert {s.type for s in first.spans} == {"LOC"}
    assert docs[0].lang == "zh"


def test_write_read_round_trip_with_spaces_and_collapse(tmp_path):
    docs = generate(20, 9)
    path = tmp_path / "notes.txt"
    write_hichit(docs, path)
    back = read_hichit(path)
    assert [d.text for d in back] == [d.text.replace("\n", " ") for d in docs]
    assert [d.spans for d in back] == [sorted(d.spans, key=lambda s: s.start) for d in docs]
    collapsed = parse_hichit(format_hichit(docs, collapse_to="LOC", scheme="BIO"))
    assert all(s.type == "LOC" for d in collapsed for s in d.spans)
    assert [len(d.spans) for d in collapsed] == [len(d.spans) for d in docs]


def test_bad_lines_name_their_line_number():
    with pytest.raises(HichitFormatError, match=":2:"):
        parse_hichit("a O\nabc B-LOC\n")
    with pytest.raises(HichitFormatError, match="document 1"):
        parse_hichit("a O\nb Q-LOC\n")
