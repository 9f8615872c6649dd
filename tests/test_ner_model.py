"""The bundled demo weights: integrity, held-out F1 per language, hand-written notes, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from models.ner.evaluate import evaluate
from models.ner.inference import DEMO_DIR, NerInputError, NerModel, check_text
from models.ner.model import META_FILE, ModelFolderError
from models.ner.synth import HELDOUT_SEED, generate
from ner_helpers import demo_model


def test_demo_folder_is_small_and_documented():
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file())
    assert size <= 6 * 1024 * 1024
    assert (DEMO_DIR / "MODEL_CARD.md").is_file()
    meta = json.loads((DEMO_DIR / META_FILE).read_text())
    assert meta["evaluation"]["f1"]["en"] >= 0.9 and meta["evaluation"]["f1"]["zh"] >= 0.9


def test_tampered_weights_are_refused(tmp_path):
    copy = tmp_path / "ner"
    shutil.copytree(DEMO_DIR, copy)
    with (copy / "model.safetensors").open("r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ModelFolderError, match="checksum"):
        NerModel(copy)
    with pytest.raises(ModelFolderError, match="ner.json"):
        NerModel(tmp_path)


def test_heldout_f1_per_language_meets_the_bar():
    result = evaluate(demo_model(), generate(160, HELDOUT_SEED))
    for lang in ("en", "zh"):
        assert result["by_lang"][lang]["micro avg"]["f1"] >= 0.90, result["by_lang"][lang]


def _by_type(result):
    out = {}
    for ent in result["entities"]:
        out.setdefault(ent["type"], []).append(ent)
    return out


def test_handwritten_english_note():
    note = ("68-year-old woman with sudden severe headache and vomiting 3 hours ago. "
            "Denies anticoagulant use. GCS 14, BP 192/104 mmHg. History of hypertension.")
    result = demo_model().extract(note)
    flags = result["flags"]
    assert result["lang"] == "en"
    assert flags["anticoagulated"] is False
    assert flags["gcs"] == 14 and (flags["sbp"], flags["dbp"]) == (192, 104)
    assert flags["age"] == 68 and flags["sex"] == "F" and flags["hypertension"] is True
    assert flags["onset_hours"] == 3.0
    drugs = _by_type(result).get("DRUG", [])
    assert drugs and all(d["negated"] for d in drugs)


def test_handwritten_chinese_note():
    note = "患者男，75岁，因突发左侧肢体无力伴头痛2小时入院。既往高血压病史10年，长期口服华法林。GCS评分12分。"
    result = demo_model().extract(note)
    flags = result["flags"]
    assert result["lang"] == "zh"
    assert flags["anticoagulated"] is True and flags["hypertension"] is True
    assert flags["gcs"] == 12 and flags["age"] == 75 and flags["sex"] == "M"
    assert flags["onset_hours"] == 2.0
    symptoms = {e["text"] for e in _by_type(result)["SYMPTOM"]}
    assert {"左侧肢体无力", "头痛"} <= symptoms


def test_long_text_is_read_in_windows():
    # Far beyond one window: the last note's entities must still be found at the right place.
    filler = "Patient resting comfortably. " * 120
    note = filler + "On warfarin for AF. GCS 9."
    result = demo_model().extract(note)
    assert result["flags"]["anticoagulated"] is True and result["flags"]["gcs"] == 9
    warfarin = next(e for e in result["entities"] if e["type"] == "DRUG")
    assert note[warfarin["start"]:warfarin["end"]] == "warfarin"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"), ("   \n\t ", "empty"), (b"\x00\x01PK\x03\x04", "binary"),
    (bytes(range(1, 32)) * 10, "control characters"), ("x" * 20_001, "too long"),
    (b"a" * 80_001, "too large"),
])
def test_bad_input_is_a_clear_error(data, message):
    with pytest.raises(NerInputError, match=message):
        check_text(data)


def test_gb18030_bytes_are_text():
    note = "患者男，67岁，突发头痛2小时，否认服用抗凝药物。"
    assert check_text(note.encode("gb18030")) == note
