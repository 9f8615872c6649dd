"""Negation/uncertainty cues, entity values and the triage flags they drive (no model needed)."""

from __future__ import annotations

import pytest

from models.ner.flags import derive_flags, entity_value, parse_gcs, parse_hours
from models.ner.negation import assess
from models.ner.tags import Span


def _spans(text: str, *pieces: tuple[str, str]) -> list[Span]:
    out = []
    for piece, typ in pieces:
        start = text.index(piece)
        out.append(Span(start, start + len(piece), typ))
    return out


def _assess(text, lang, *pieces):
    return assess(text, _spans(text, *pieces), lang)


@pytest.mark.parametrize("text, drug, expected", [
    ("Denies anticoagulant use.", "anticoagulant", (True, False)),
    ("Pt denies warfarin.", "warfarin", (True, False)),
    ("No anticoagulants.", "anticoagulants", (True, False)),
    ("Not on apixaban since 2019.", "apixaban", (True, False)),
    ("Warfarin: none.", "Warfarin", (True, False)),
    ("On warfarin for AF.", "warfarin", (False, False)),
    ("No headache; takes aspirin daily.", "aspirin", (False, False)),
    ("Denies HTN but takes clopidogrel.", "clopidogrel", (False, False)),
    ("? on apixaban", "apixaban", (False, True)),
    ("Possibly on Eliquis.", "Eliquis", (False, True)),
    ("Xarelto status unknown.", "Xarelto", (False, True)),
])
def test_english_drug_cues(text, drug, expected):
    assert _assess(text, "en", (drug, "DRUG")) == [expected]


@pytest.mark.parametrize("text, drug, expected", [
    ("否认服用抗凝药物。", "抗凝药物", (True, False)),
    ("未服用华法林。", "华法林", (True, False)),
    ("无抗凝药、阿司匹林服用史。", "阿司匹林", (True, False)),
    ("长期口服华法林。", "华法林", (False, False)),
    ("否认高血压病史，长期服用阿司匹林。", "阿司匹林", (False, False)),
    ("可能服用氯吡格雷。", "氯吡格雷", (False, True)),
    ("抗凝药服用史不详。", "抗凝药", (False, True)),
])
def test_chinese_drug_cues(text, drug, expected):
    assert _assess(text, "zh", (drug, "DRUG")) == [expected]


def test_entity_text_and_pseudo_cues_never_negate():
    # "不" inside 言语不清 and "无" inside 无明显诱因 are not cues for 头痛.
    text = "患者无明显诱因出现言语不清及头痛。"
    assert _assess(text, "zh", ("言语不清", "SYMPTOM"), ("头痛", "SYMPTOM")) == [(False, False)] * 2
    text = "CT head without contrast: headache."
    assert _assess(text, "en", ("headache", "SYMPTOM")) == [(False, False)]


def test_negation_scope_covers_a_list_until_a_terminator():
    text = "Denies headache, vomiting or seizure. Reports dizziness."
    result = _assess(text, "en", ("headache", "SYMPTOM"), ("vomiting", "SYMPTOM"),
                     ("seizure", "SYMPTOM"), ("dizziness", "SYMPTOM"))
    assert [neg for neg, _ in result] == [True, True, True, False]


def _ent(typ, text, negated=False, uncertain=False):
    return {"type": typ, "text": text, "value": entity_value(typ, text), "negated": negated,
            "uncertain": uncertain}


def test_negated_or_uncertain_drug_never_sets_anticoagulated():
    assert derive_flags([_ent("DRUG", "anticoagulant", negated=True)])["anticoagulated"] is False
    flags = derive_flags([_ent("DRUG", "apixaban", uncertain=True)])
    assert flags["anticoagulated"] is False and flags["anticoagulation_uncertain"] is True
    flags = derive_flags([_ent("DRUG", "warfarin"), _ent("DRUG", "aspirin")])
    assert flags["anticoagulated"] is True and flags["antiplatelet"] is True
    only_asa = derive_flags([_ent("DRUG", "阿司匹林")])
    assert only_asa["anticoagulated"] is False and only_asa["antiplatelet"] is True


def test_flags_take_values_from_affirmed_entities():
    flags = derive_flags([
        _ent("GCS", "GCS 14"), _ent("GCS", "GCS E2V2M4"), _ent("BP", "BP 185/100 mmHg"),
        _ent("BP", "血压160/90mmHg"), _ent("HTN", "HTN", negated=True), _ent("ONSET", "3小时前"),
        _ent("AGE", "67岁"), _ent("SEX", "女性"), _ent("HEM_VOL", "约25ml"),
    ])
    assert flags["gcs"] == 8  # the worst score
    assert (flags["sbp"], flags["dbp"]) == (185, 100)
    assert flags["hypertension"] is False
    assert flags["onset_hours"] == 3.0 and flags["age"] == 67 and flags["sex"] == "F"
    assert flags["hemorrhage_volume_ml"] == 25.0
    assert derive_flags([_ent("HTN", "高血压")])["hypertension"] is True


@pytest.mark.parametrize("text, hours", [
    ("2 hours ago", 2.0), ("45 min", 0.75), ("1 day ago", 24.0), ("半小时前", 0.5),
    ("3小时余", 3.0), ("30分钟", 0.5), ("yesterday", 24.0), ("this morning", None),
])
def test_onset_hours(text, hours):
    assert parse_hours(text) == hours


@pytest.mark.parametrize("text, gcs", [
    ("GCS 13", 13), ("GCS 14/15", 14), ("GCS E3V4M6", 13), ("格拉斯哥昏迷评分9分", 9),
    ("GCS E1VTM4", 6), ("GCS 20", None),
])
def test_gcs_values(text, gcs):
    assert parse_gcs(text) == gcs
