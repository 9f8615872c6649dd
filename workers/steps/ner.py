"""NER step (ner queue): the study's clinical text -> entities and triage flags on the study.

Text comes from the study's DICOM free-text attributes (read from one spool file of the study)
and from ClinicalText rows (HL7 MLLP, CLI) matched by study UID, accession number or patient ID.
Each text is analysed on its own (language per text); a bad text (empty, binary, oversize) is
recorded with its reason and skipped, never failing the job. Only counts and hashed UIDs are
logged: the text is PHI.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from node.config import Settings
from node.index import ClinicalText, Index, Instance, Series, Study
from node.logs import uid_ref
from workers.context import StepContext, StepError

log = logging.getLogger(__name__)

# DICOM attributes that carry free clinical text (top level or inside RequestAttributesSequence).
TEXT_KEYWORDS = (
    "AdditionalPatientHistory", "ReasonForTheRequestedProcedure", "RequestedProcedureDescription",
    "ReasonForStudy", "RequestedProcedureComments", "ImagingServiceRequestComments",
    "AdmittingDiagnosesDescription", "PatientComments", "ImageComments",
)
# A text matched only by patient ID must be this close in time to the study (older notes are
# about another visit).
PATIENT_MATCH_WINDOW = timedelta(days=2)


def dicom_texts(path: Path) -> list[tuple[str, str]]:
    """(keyword, text) pairs from one DICOM file's header (pixel data never read)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    found: list[tuple[str, str]] = []
    datasets = [ds] + list(getattr(ds, "RequestAttributesSequence", None) or [])
    for item in datasets:
        for keyword in TEXT_KEYWORDS:
            value = item.get(keyword)
            text = str(value).strip() if value is not None else ""
            if text and all(text != t for _, t in found):
                found.append((keyword, text))
    return found


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def matching_texts(session: Session, study: Study) -> list[ClinicalText]:
    """ClinicalText rows for the study: by UID or accession, or by patient ID near in time when
    the text names no accession of another study."""
    conds = [ClinicalText.study_uid == study.study_uid]
    if study.accession_number:
        conds.append(ClinicalText.accession_number == study.accession_number)
    if study.patient_id:
        conds.append(ClinicalText.patient_id == study.patient_id)
    rows = session.scalars(select(ClinicalText).where(or_(*conds)).order_by(ClinicalText.id)).all()
    keep = []
    for row in rows:
        if row.study_uid == study.study_uid or (
                study.accession_number and row.accession_number == study.accession_number):
            keep.append(row)
            continue
        if row.study_uid or (row.accession_number and row.accession_number != study.accession_number
                             and _accession_taken(session, row.accession_number, study.id)):
            continue  # linked to, or named for, another study
        received, first = _aware(row.received_at), _aware(study.first_received)
        if received and first and abs(received - first) > PATIENT_MATCH_WINDOW:
            continue
        keep.append(row)
    return keep


def _accession_taken(session: Session, accession: str, study_id: int) -> bool:
    other = session.scalar(select(Study.id).where(Study.accession_number == accession,
                                                  Study.id != study_id).limit(1))
    return other is not None


def _one_instance_path(session: Session, settings: Settings, study: Study) -> Path | None:
    rel = session.scalar(select(Instance.path).join(Series).where(Series.study_id == study.id)
                         .order_by(Instance.id).limit(1))
    return settings.storage.spool_dir / rel if rel else None


def _model(settings: Settings):
    from models.ner.inference import get_model
    from models.ner.model import ModelFolderError

    device = "cuda" if settings.models.device == "cuda" else "cpu"
    try:
        return get_model(settings.models.ner, device)
    except (ModelFolderError, OSError) as exc:
        raise StepError(f"NER model cannot be loaded: {exc}") from exc


def analyse_study(settings: Settings, index: Index, study_id: int) -> dict[str, Any]:
    """Run NER over all text of one study and store entities + flags on it."""
    from models.ner.flags import derive_flags
    from models.ner.inference import NerInputError

    model = _model(settings)
    with index.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise StepError(f"study {study_id} not in the index")
        study_ref = uid_ref(study.study_uid)
        sources: list[tuple[str, str, ClinicalText | None]] = []
        errors: list[dict[str, str]] = []
        path = _one_instance_path(session, settings, study)
        if path is not None:
            try:
                sources += [(f"dicom:{kw}", text, None) for kw, text in dicom_texts(path)]
            except Exception as exc:  # noqa: BLE001 - a bad file must not stop the other texts
                errors.append({"source": "dicom", "reason": f"cannot read header: {type(exc).__name__}"})
        for row in matching_texts(session, study):
            sources.append((f"{row.source}:{row.id}", row.text, row))

        entities: list[dict[str, Any]] = []
        summary = []
        for name, text, row in sources:
            try:
                result = model.extract(text)
            except NerInputError as exc:
                errors.append({"source": name, "reason": str(exc)})
                continue
            for ent in result["entities"]:
                ent["source"] = name
            entities += result["entities"]
            summary.append({"source": name, "lang": result["lang"],
                            "entities": len(result["entities"])})
            if row is not None:
                row.entities = {"model": model.info, **result}
                row.study_uid = study.study_uid
        flags = derive_flags(entities)
        study.entities = {"model": model.info, "entities": entities, "flags": flags,
                          "sources": summary, "errors": errors,
                          "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    log.info("ner done", extra={"study": study_ref, "texts": len(sources), "entities": len(entities),
                                "skipped": len(errors)})
    return {"entities": len(entities), "flags": flags}


def run(ctx: StepContext, previous: dict) -> dict:
    with ctx.index.session() as session:
        job = ctx.job(session)
        if job is None:
            raise StepError(f"job {ctx.job_id} not in the index")
        study_id = job.study_id
    return analyse_study(ctx.settings, ctx.index, study_id)
