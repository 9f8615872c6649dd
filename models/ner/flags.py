"""Values of entities (GCS 13, BP 185/100, 3 hours) and the study-level flags the priority rules use.

Only affirmed mentions set a flag: a negated ("denies warfarin") or uncertain ("? on warfarin")
drug never makes ``anticoagulated`` true; an uncertain one sets ``anticoagulation_uncertain``.
"""

from __future__ import annotations

import re
from typing import Any

ANTIPLATELET_WORDS = ("aspirin", "asa", "clopidogrel", "plavix", "ticagrelor", "brilinta",
                      "prasugrel", "effient", "antiplatelet", "dapt", "阿司匹林", "阿司匹灵",
                      "氯吡格雷", "替格瑞洛", "波立维", "普拉格雷", "抗血小板")

_CN_DIGITS = {"半": 0.5, "一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
              "八": 8, "九": 9, "十": 10}
_UNIT_HOURS = [
    (r"(?:minutes?|mins?|分钟|min)", 1 / 60),
    (r"(?:hours?|hrs?|h|小时|钟头)", 1.0),
    (r"(?:days?|d|天|日)", 24.0),
    (r"(?:weeks?|wks?|周)", 168.0),
]
_WORD_HOURS = {"yesterday": 24.0, "last night": 12.0, "昨晚": 12.0, "昨天": 24.0, "昨日": 24.0}


def drug_class(text: str) -> str:
    """'antiplatelet' or 'anticoagulant' (anything else we tagged counts as anticoagulant: a
    false 'anticoagulated' raises priority, a missed one could delay a reversal)."""
    low = text.lower()
    return "antiplatelet" if any(w in low for w in ANTIPLATELET_WORDS) else "anticoagulant"


def parse_gcs(text: str) -> int | None:
    evm = re.search(r"E\s*([1-4])\s*V\s*([1-5T])\s*M\s*([1-6])", text, re.I)
    if evm:
        v = 1 if evm.group(2).upper() == "T" else int(evm.group(2))
        return int(evm.group(1)) + v + int(evm.group(3))
    over = re.search(r"(\d{1,2})\s*/\s*15", text)
    if over and 3 <= int(over.group(1)) <= 15:
        return int(over.group(1))
    for num in re.findall(r"\d{1,2}", text):
        if 3 <= int(num) <= 15:
            return int(num)
    return None


def parse_bp(text: str) -> tuple[int | None, int | None]:
    pair = re.search(r"(\d{2,3})\s*/\s*(\d{2,3})", text)
    if pair:
        return int(pair.group(1)), int(pair.group(2))
    single = re.search(r"(\d{2,3})", text)
    return (int(single.group(1)), None) if single else (None, None)


def parse_hours(text: str) -> float | None:
    low = text.lower()
    for word, hours in _WORD_HOURS.items():
        if word in low:
            return hours
    for unit, factor in _UNIT_HOURS:
        m = re.search(r"(\d+(?:\.\d+)?|[半一两二三四五六七八九十])\s*" + unit + r"(?![a-z])", low)
        if m:
            raw = m.group(1)
            value = float(raw) if raw[0].isdigit() else _CN_DIGITS[raw]
            return round(value * factor, 2)
    if "半" in low and ("小时" in low or "钟头" in low):
        return 0.5
    return None


def parse_age(text: str) -> int | None:
    m = re.search(r"\d{1,3}", text)
    return int(m.group()) if m and 0 <= int(m.group()) <= 120 else None


def parse_sex(text: str) -> str | None:
    low = text.strip().lower()
    if low in ("m", "male", "man", "gentleman", "boy") or low.startswith("男"):
        return "M"
    if low in ("f", "female", "woman", "lady", "girl") or low.startswith("女"):
        return "F"
    return None


def parse_volume(text: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def entity_value(typ: str, text: str) -> Any:
    """The normalised value of one entity, or None."""
    if typ == "GCS":
        return parse_gcs(text)
    if typ == "BP":
        sbp, dbp = parse_bp(text)
        return None if sbp is None else {"sbp": sbp, "dbp": dbp}
    if typ == "ONSET":
        return parse_hours(text)
    if typ == "AGE":
        return parse_age(text)
    if typ == "SEX":
        return parse_sex(text)
    if typ == "DRUG":
        return drug_class(text)
    if typ == "HEM_VOL":
        return parse_volume(text)
    return None


def derive_flags(entities: list[dict]) -> dict[str, Any]:
    """Study-level flags from entity dicts (type, value, negated, uncertain)."""
    flags: dict[str, Any] = {
        "anticoagulated": False, "antiplatelet": False, "anticoagulation_uncertain": False,
        "hypertension": False, "gcs": None, "sbp": None, "dbp": None, "onset_hours": None,
        "age": None, "sex": None, "hemorrhage_volume_ml": None,
    }
    for ent in entities:
        typ, value = ent["type"], ent.get("value")
        if ent.get("negated"):
            continue
        if ent.get("uncertain"):
            if typ == "DRUG":
                flags["anticoagulation_uncertain"] = True
            continue
        if typ == "DRUG":
            flags["antiplatelet" if value == "antiplatelet" else "anticoagulated"] = True
        elif typ == "HTN":
            flags["hypertension"] = True
        elif typ == "GCS" and value is not None:
            # The worst (lowest) score counts for triage.
            flags["gcs"] = value if flags["gcs"] is None else min(flags["gcs"], value)
        elif typ == "BP" and value:
            if flags["sbp"] is None or value["sbp"] > flags["sbp"]:
                flags["sbp"], flags["dbp"] = value["sbp"], value["dbp"]
        elif typ == "ONSET" and value is not None and flags["onset_hours"] is None:
            flags["onset_hours"] = value
        elif typ == "AGE" and value is not None and flags["age"] is None:
            flags["age"] = value
        elif typ == "SEX" and value and flags["sex"] is None:
            flags["sex"] = value
        elif typ == "HEM_VOL" and value is not None:
            flags["hemorrhage_volume_ml"] = max(value, flags["hemorrhage_volume_ml"] or 0.0)
    return flags
