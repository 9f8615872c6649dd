"""The ner pipeline step: DICOM free text + matched ClinicalText rows -> entities/flags on the study."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from node.index import ClinicalText, Instance, Job, Series, Study, open_index
from ner_helpers import make_settings, write_ct_header
from workers.context import StepContext, StepError
from workers.steps import ner as ner_step


@pytest.fixture()
def env(tmp_path):
    settings = make_settings(tmp_path)
    index = open_index(settings)
    yield settings, index
    index.dispose()


def _study(settings, index, *, uid="1.2.826.0.1.3680043.8.498.1", accession="ACC-7",
           patient="PAT-7", history=None, reason=None) -> int:
    rel = f"{uid}/ct.dcm"
    write_ct_header(settings.storage.spool_dir / rel, study_uid=uid, accession=accession,
                    patient_id=patient, history=history, reason=reason)
    with index.session() as s:
        study = Study(study_uid=uid, accession_number=accession, patient_id=patient)
        series = Series(series_uid=uid + ".1", study=study, modality="CT")
        s.add_all([study, series, Instance(series=series, sop_instance_uid=uid + ".1.1",
                                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                           transfer_syntax_uid="1.2.840.10008.1.2.1",
                                           path=rel, size=1, sha256="0" * 64)])
        s.flush()
        job = Job(study_id=study.id)
        s.add(job)
        s.flush()
        return job.id


def _texts(index, *rows):
    with index.session() as s:
        s.add_all([ClinicalText(source="hl7", **row) for row in rows])


def test_step_combines_dicom_and_matched_texts(env):
    settings, index = env
    job_id = _study(settings, index, history="72 yo male, sudden headache 2 hours ago. Denies HTN.",
                    reason="r/o ICH, GCS 13")
    old = datetime.now(UTC) - timedelta(days=30)
    _texts(index,
           {"accession_number": "ACC-7", "text": "患者男，72岁。长期口服华法林。血压190/105mmHg。"},
           {"patient_id": "PAT-7", "text": "BP 200/110 mmHg on arrival."},
           # Another visit's accession and an old patient-only note: both must be ignored.
           {"patient_id": "PAT-7", "accession_number": "ACC-OTHER", "text": "Takes apixaban daily."},
           {"patient_id": "PAT-7", "text": "Takes rivaroxaban.", "received_at": old},
           {"accession_number": "ACC-7", "text": "\x01\x02\x03\x04 binary \x05\x06\x07\x08"})
    with index.session() as s:
        s.add(Study(study_uid="1.2.3.999", accession_number="ACC-OTHER", patient_id="PAT-7"))

    out = ner_step.run(StepContext(settings, index, job_id), {})

    with index.session() as s:
        study = s.get(Job, job_id).study
        stored = study.entities
        linked = s.query(ClinicalText).filter(ClinicalText.study_uid == study.study_uid).count()
    assert out["entities"] == len(stored["entities"]) > 5
    flags = stored["flags"]
    assert flags["anticoagulated"] is True  # 华法林 in the accession-matched HL7 text
    assert flags["hypertension"] is False  # "Denies HTN"
    assert flags["gcs"] == 13 and flags["age"] == 72 and flags["sex"] == "M"
    assert flags["sbp"] == 200  # the highest of the matched readings
    drugs = {e["text"] for e in stored["entities"] if e["type"] == "DRUG"}
    assert "apixaban" not in drugs and "rivaroxaban" not in drugs
    sources = {s["source"].split(":")[0] for s in stored["sources"]}
    assert sources == {"dicom", "hl7"}
    assert [e["reason"] for e in stored["errors"]] == ["binary input: too many control characters for text"]
    assert linked == 2


def test_step_without_any_text_stores_empty_result(env):
    settings, index = env
    job_id = _study(settings, index)
    assert ner_step.run(StepContext(settings, index, job_id), {})["entities"] == 0
    with index.session() as s:
        stored = s.get(Job, job_id).study.entities
    assert stored["entities"] == [] and stored["flags"]["anticoagulated"] is False


def test_step_survives_a_missing_spool_file_and_reports_bad_model(env, tmp_path):
    settings, index = env
    job_id = _study(settings, index, history="On warfarin.")
    for path in settings.storage.spool_dir.rglob("*.dcm"):
        path.unlink()
    ner_step.run(StepContext(settings, index, job_id), {})
    with index.session() as s:
        assert s.get(Job, job_id).study.entities["errors"][0]["source"] == "dicom"
    bad = settings.model_copy(update={"models": settings.models.model_copy(update={"ner": tmp_path})})
    with pytest.raises(StepError, match="NER model"):
        ner_step.run(StepContext(bad, index, job_id), {})
