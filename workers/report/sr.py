"""TID 1500 Measurement Report (highdicom Comprehensive 3D SR) of the analysis.

Content (one measurement group each):
* per label (any ICH + 5 subtypes): presence (Present/Absent) + probability, TID 1501;
* per SEG segment: volume (mL), TID 1411 with an explicit reference to the SEG segment (built by
  hand: ``ReferencedSegment.from_segmentation`` failed on single-segment SEGs in highdicom 0.28.2);
* hematoma summary: total volume (voxel sum), ABC/2 volume, midline shift (mm), TID 1501;
* clinical context from NER (when present): coded flags (anticoagulant, hypertension) and the
  entities as text.
Algorithm identification (name, version, weights sha256 as a parameter) is on every group.
A "not analysed" report has one group with "presence undetermined" and the reason as text.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import CodedConcept, RelationshipTypeValues
from pydicom.dataset import Dataset

from models.results import LABELS, AnalysisResult, ModelInfo
from workers.report import codes
from workers.report.entities import context_items
from workers.report.seg import MANUFACTURER, Segment, segmentation_model

SR_SERIES_NUMBER = 9902


def _algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64], version=model.version[:64],
        parameters=[f"{codes.WEIGHTS_SHA256}={model.sha256}"])


def _triage_model(models: list[ModelInfo]) -> ModelInfo:
    for m in models:
        if "triage" in m.name.lower() or "class" in m.name.lower():
            return m
    return models[0] if models else ModelInfo(name="unknown", version="unknown", sha256="unknown")


def _tracking(sop_uid: str, key: str, text: str) -> hd.sr.TrackingIdentifier:
    from pydicom.uid import generate_uid

    return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, key]), identifier=text[:64])


def _observation_context() -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid="2.25.1870938519211049130392958765012939617",  # fixed: identifies the ichnode device
        name="ichnode", manufacturer_name=MANUFACTURER, model_name="ichnode report")
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=device))


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024],
                                 relationship_type=RelationshipTypeValues.CONTAINS)


def _append(group, items) -> None:
    """Add content items to a measurement group's container (TID 1501 allows TEXT evaluations)."""
    container = group[0]
    for item in items:
        container.ContentSequence.append(item)


def finding_groups(result: AnalysisResult, sop_uid: str) -> list:
    algo = _algorithm(_triage_model(result.models))
    groups = []
    for label in LABELS:
        f = result.findings.get(label)
        if f is None:
            continue
        is_any = label == "any"
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(sop_uid, f"finding-{label}",
                                          "ICH any" if is_any else f"ICH {label}"),
            finding_type=codes.INTRACRANIAL_HEMORRHAGE if is_any else codes.HEMORRHAGE,
            finding_sites=None if is_any else [hd.sr.FindingSite(codes.SUBTYPE_SITE[label])],
            algorithm_id=algo,
            measurements=[hd.sr.Measurement(name=codes.PROBABILITY, value=round(f.probability, 4),
                                            unit=codes.UNIT_NONE, algorithm_id=algo)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                codes.PRESENCE, codes.PRESENT if f.present else codes.ABSENT)],
        ))
        if not is_any:
            _append(groups[-1], [_text(codes.COMMENT, codes.SUBTYPE_LABEL[label])])
    return groups


def segment_groups(result: AnalysisResult, seg: Dataset | None, segments: list[Segment],
                   volumes_ml: dict[str, float], sop_uid: str) -> list:
    if seg is None:
        return []
    algo = _algorithm(segmentation_model(result.models))
    source_series = hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    groups = []
    for s in segments:
        ref = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                      segment_number=s.number, source_series=source_series)
        site = s.region if s.is_hematoma else codes.LATERAL_VENTRICLE
        modifier = None if s.is_hematoma else s.modifier
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(sop_uid, f"segment-{s.key}", s.label),
            referenced_segment=ref,
            finding_type=codes.HEMORRHAGE if s.is_hematoma else codes.LATERAL_VENTRICLE,
            finding_sites=[hd.sr.FindingSite(site, laterality=modifier)] if site is not None else None,
            algorithm_id=algo,
            measurements=[hd.sr.Measurement(name=codes.VOLUME, value=round(volumes_ml[s.key], 2),
                                            unit=codes.UNIT_ML, method=codes.VOXEL_COUNT_METHOD,
                                            algorithm_id=algo)],
        ))
    return groups


def summary_group(result: AnalysisResult, sop_uid: str, has_hematoma_segment: bool):
    algo = _algorithm(segmentation_model(result.models))
    ms = []
    if result.hematoma_volume_ml is not None:
        ms.append(hd.sr.Measurement(name=codes.VOLUME, value=round(result.hematoma_volume_ml, 2),
                                    unit=codes.UNIT_ML, method=codes.VOXEL_COUNT_METHOD, algorithm_id=algo))
    if result.hematoma_abc2_ml is not None:
        ms.append(hd.sr.Measurement(name=codes.VOLUME, value=round(result.hematoma_abc2_ml, 2),
                                    unit=codes.UNIT_ML, method=codes.ABC2_METHOD, algorithm_id=algo))
    if result.midline_shift_mm is not None:
        ms.append(hd.sr.Measurement(name=codes.MIDLINE_SHIFT, value=round(result.midline_shift_mm, 2),
                                    unit=codes.UNIT_MM, algorithm_id=algo))
    if not ms:
        return None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_uid, "summary", "Hematoma summary"),
        finding_type=codes.INTRACRANIAL_HEMORRHAGE, algorithm_id=algo, measurements=ms)
    if not has_hematoma_segment:
        _append(group, [_text(codes.COMMENT, "No hematoma segmented; no SEG segment for hematoma.")])
    return group


def context_group(entities: dict | None, sop_uid: str):
    flags, texts = context_items(entities)
    if not flags and not texts:
        return None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_uid, "context", "Clinical context (NER)"),
        finding_type=codes.HISTORY,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name, codes.PRESENT) for name in flags] or None)
    _append(group, [_text(codes.NER_ENTITY, t) for t in texts])
    return group


def build_sr(sources: list[Dataset], result: AnalysisResult, *, seg: Dataset | None,
             segments: list[Segment], volumes_ml: dict[str, float], entities: dict | None,
             sop_instance_uid: str, series_instance_uid: str) -> Dataset:
    groups = finding_groups(result, sop_instance_uid)
    groups += segment_groups(result, seg, segments, volumes_ml, sop_instance_uid)
    summary = summary_group(result, sop_instance_uid, any(s.is_hematoma for s in segments))
    context = context_group(entities, sop_instance_uid)
    groups += [g for g in (summary, context) if g is not None]
    evidence = list(sources) + ([seg] if seg is not None else [])
    return _document(evidence, groups, sop_instance_uid, series_instance_uid,
                     "ichnode ICH report (AI, not verified)")


def build_not_analysed_sr(sources: list[Dataset], reason: str, *, entities: dict | None,
                          sop_instance_uid: str, series_instance_uid: str) -> Dataset:
    """A short report that says the study was NOT analysed and why (nobody waits in vain)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "not-analysed", "Not analysed"),
        finding_type=codes.INTRACRANIAL_HEMORRHAGE,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE, codes.PRESENCE_UNDETERMINED)])
    _append(group, [_text(codes.NOT_ANALYSED, f"Not analysed by ichnode: {reason}")])
    groups = [group]
    context = context_group(entities, sop_instance_uid)
    if context is not None:
        groups.append(context)
    return _document(list(sources), groups, sop_instance_uid, series_instance_uid,
                     "ichnode: NOT ANALYSED")


def _document(evidence: list[Dataset], groups: list, sop_uid: str, series_uid: str,
              description: str) -> Dataset:
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=codes.PROCEDURE_CT_HEAD,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
    )
    sr.SeriesDescription = description[:64]
    sr.CodingSchemeIdentificationSequence = _coding_schemes()
    return sr


def _coding_schemes() -> list[Dataset]:
    out = []
    for designator, (uid, name) in codes.CODING_SCHEMES.items():
        item = Dataset()
        item.CodingSchemeDesignator = designator
        if uid:
            item.CodingSchemeUID = uid
        item.CodingSchemeName = name
        out.append(item)
    return out
