"""Read the NER worker's output (Study.entities) tolerantly, for SR context, rules and priority.

Accepted shapes: ``{"entities": [{"label": ..., "text": ...}, ...], "flags": {...}}``, a bare
list of such entities, or ``{"LABEL": ["text", ...]}``. Flags are booleans such as
``anticoagulated`` or ``hypertension``; they are also derived from entity labels when the NER
output has no ``flags`` mapping.
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept

from workers.report import codes

_FLAG_FROM_LABEL = {
    "anticoagulated": re.compile(r"(?i)anticoag|antiplatelet|antithromb"),
    "hypertension": re.compile(r"(?i)hypertens|htn"),
}


def entity_list(entities) -> list[tuple[str, str]]:
    """(label, text) pairs."""
    if not entities:
        return []
    items = entities.get("entities", entities) if isinstance(entities, dict) else entities
    out: list[tuple[str, str]] = []
    if isinstance(items, dict):
        for label, values in items.items():
            if label == "flags":
                continue
            for v in values if isinstance(values, list) else [values]:
                out.append((str(label), str(v.get("text", v) if isinstance(v, dict) else v)))
        return out
    for e in items:
        if isinstance(e, dict):
            text = str(e.get("text") or e.get("value") or "")
            # A negated ("denies warfarin") or uncertain mention must never read as a finding.
            text += " (negated)" if e.get("negated") else ""
            text += " (uncertain)" if e.get("uncertain") else ""
            out.append((str(e.get("label") or e.get("type") or "?"), text))
    return out


def flags(entities) -> dict[str, bool]:
    """Boolean clinical flags (anticoagulated, hypertension, ...)."""
    out: dict[str, bool] = {}
    if isinstance(entities, dict) and isinstance(entities.get("flags"), dict):
        out.update({str(k): bool(v) for k, v in entities["flags"].items()})
    for label, _text in entity_list(entities):
        for flag, pattern in _FLAG_FROM_LABEL.items():
            if pattern.search(label):
                out.setdefault(flag, True)
    return out


def context_items(entities) -> tuple[list[CodedConcept], list[str]]:
    """Coded flags present + one text line per entity, for the SR's clinical context group."""
    f = flags(entities)
    coded = []
    if f.get("anticoagulated"):
        coded.append(codes.ANTICOAGULANT)
    if f.get("hypertension"):
        coded.append(codes.HISTORY_OF_HYPERTENSION)
    texts = [f"{label}: {text}" for label, text in entity_list(entities)][:50]
    return coded, texts
