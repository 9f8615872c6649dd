"""The synthetic note generator: deterministic, exact spans, disjoint train/held-out seeds."""

from __future__ import annotations

from collections import Counter

import pytest

from models.ner.negation import assess
from models.ner.synth import HELDOUT_SEED, TRAIN_SEED, generate
from models.ner.tags import ENTITY_TYPES


def test_same_seed_same_notes_and_other_seed_other_notes():
    a, b = generate(50, 3), generate(50, 3)
    assert [(d.text, d.spans) for d in a] == [(d.text, d.spans) for d in b]
    assert [d.text for d in generate(50, 4)] != [d.text for d in a]


def test_spans_are_exact_and_typed():
    types = Counter()
    for doc in generate(400, 11):
        for span in doc.spans:
            piece = doc.text[span.start:span.end]
            assert piece and piece == piece.strip(), (doc.text, span)
            assert span.type in ENTITY_TYPES
            types[(doc.lang, span.type)] += 1
    # Every entity type occurs in both languages.
    assert all(types[(lang, t)] > 5 for lang in ("en", "zh") for t in ENTITY_TYPES), types


def test_languages_alternate_and_can_be_chosen():
    assert [d.lang for d in generate(4, 1)] == ["en", "zh", "en", "zh"]
    assert {d.lang for d in generate(10, 1, "zh")} == {"zh"}
    with pytest.raises(ValueError):
        generate(1, 1, "ru")


def test_heldout_notes_are_mostly_unseen_in_training():
    train = {d.text for d in generate(3000, TRAIN_SEED)}
    held = [d.text for d in generate(300, HELDOUT_SEED)]
    assert sum(t in train for t in held) <= 3


def test_negations_and_uncertainty_present_and_cue_rules_agree():
    docs = generate(1500, 21)
    negated = uncertain = 0
    for doc in docs:
        for span, (neg, unc) in zip(doc.spans, assess(doc.text, doc.spans, doc.lang)):
            assert neg == (span in doc.negated), (doc.text, doc.text[span.start:span.end])
            assert unc == (span in doc.uncertain), (doc.text, doc.text[span.start:span.end])
            negated += neg
            uncertain += unc
    assert negated > 300 and uncertain > 50
