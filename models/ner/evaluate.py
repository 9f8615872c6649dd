"""Entity-level precision/recall/F1 per type (seqeval, exact spans) on held-out documents.

Gold and predicted spans are compared as character-level BIO sequences, so the score does not
depend on the tokenizer. When the gold documents use HICH-IT's single LOC type, predictions are
collapsed to LOC before scoring.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from seqeval.metrics import classification_report

from models.ner.document import Document
from models.ner.inference import NerModel
from models.ner.tags import HICHIT_TYPE, ENTITY_TYPES, Span, spans_to_tags


def _char_tags(doc_text: str, spans: list[Span]) -> list[str]:
    # seqeval needs at least one position; whitespace is never part of an entity.
    return spans_to_tags(len(doc_text), spans, "BIO") or ["O"]


def score(gold: list[list[str]], pred: list[list[str]]) -> dict[str, dict[str, float]]:
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    out = {}
    for key, row in report.items():
        out[key] = {"precision": round(float(row["precision"]), 4),
                    "recall": round(float(row["recall"]), 4),
                    "f1": round(float(row["f1-score"]), 4), "support": int(row["support"])}
    return out


def evaluate(model: NerModel, docs: list[Document], *, batch_size: int = 32) -> dict[str, Any]:
    """{"overall": {type: prf}, "by_lang": {lang: {type: prf}}, "documents": n}."""
    collapse = bool(docs) and all(s.type not in ENTITY_TYPES for d in docs for s in d.spans)
    texts = [d.text for d in docs]
    predicted = model.predict(texts, langs=[d.lang if d.lang != "und" else None for d in docs],
                              batch_size=batch_size)
    gold_tags: dict[str, list] = defaultdict(list)
    pred_tags: dict[str, list] = defaultdict(list)
    for doc, ents in zip(docs, predicted):
        spans = [Span(e.start, e.end, HICHIT_TYPE if collapse else e.type) for e in ents]
        for key in ("all", doc.lang):
            gold_tags[key].append(_char_tags(doc.text, doc.spans))
            pred_tags[key].append(_char_tags(doc.text, spans))
    result: dict[str, Any] = {"documents": len(docs), "overall": score(gold_tags["all"], pred_tags["all"]),
                              "by_lang": {}}
    for lang in sorted(k for k in gold_tags if k != "all"):
        result["by_lang"][lang] = score(gold_tags[lang], pred_tags[lang])
        result["by_lang"][lang]["documents"] = sum(1 for d in docs if d.lang == lang)
    return result


def negation_agreement(model: NerModel, docs: list[Document]) -> dict[str, float]:
    """Share of correctly found entities whose negated/uncertain attribute matches the generator."""
    predicted = model.predict([d.text for d in docs], langs=[d.lang for d in docs])
    hits = agree_neg = agree_unc = 0
    for doc, ents in zip(docs, predicted):
        gold = {(s.start, s.end, s.type): s for s in doc.spans}
        for e in ents:
            span = gold.get((e.start, e.end, e.type))
            if span is None:
                continue
            hits += 1
            agree_neg += e.negated == (span in doc.negated)
            agree_unc += e.uncertain == (span in doc.uncertain)
    return {"entities": hits, "negated_accuracy": round(agree_neg / max(hits, 1), 4),
            "uncertain_accuracy": round(agree_unc / max(hits, 1), 4)}
