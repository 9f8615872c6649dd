"""SEG / SR / overlay built against original CT instances: validated by dicom3tools and DCMTK,
then read back with highdicom and checked for content (codes, units, values, references)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.results import SUBTYPES
from results_helpers import analysis_result, write_ct_series
from workers.report import codes
from workers.report.builder import build_results
from workers.report.sources import load_sources, slice_volumes_ml

ENTITIES = {"entities": [{"label": "ANTICOAGULANT", "text": "warfarin 5 mg"},
                         {"label": "GCS", "text": "13"}]}


def _errors(cmd: list[str]) -> tuple[int, list[str]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [ln for ln in lines if ln.startswith("Error") or ln.startswith("Abort")]


def _build(tmp_path: Path, *, tilt=0.0, uneven=False, subtypes=("intraparenchymal", "subdural"),
           empty=False, entities=ENTITIES):
    st = write_ct_series(tmp_path / "ct", tilt_deg=tilt, uneven=uneven, subtypes=subtypes)
    sources = load_sources(st.paths)
    masks = st.masks
    if empty:
        masks = {k: np.zeros_like(v) for k, v in masks.items()}
    result = analysis_result(masks, voxel_ml=float(slice_volumes_ml(sources).mean()),
                             present=() if empty else subtypes)
    built = build_results(sources, result, masks, entities, tmp_path / "results",
                          uid_seed="test", priority="URGENT", priority_reasons=["URGENT: test"])
    return st, sources, result, built


def _texts(path: Path) -> list[str]:
    """Every TEXT value in an SR content tree (repr() of a dataset truncates long values)."""
    out: list[str] = []

    def walk(items) -> None:
        for item in items:
            if "TextValue" in item:
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def _validate_all(st, built) -> None:
    for path in built.paths:
        rc, errors = _errors(["dciodvfy", str(path)])
        assert errors == [], f"{path.name}: {errors}"
    rc, errors = _errors(["dcentvfy", *map(str, st.paths), *map(str, built.paths)])
    assert rc == 0 and errors == []
    proc = subprocess.run(["dsrdump", str(built.sr)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tilt,uneven", [(0.0, False), (18.0, True)])
def test_seg_sr_overlay_valid_and_consistent(tmp_path, tilt, uneven):
    st, sources, result, built = _build(tmp_path, tilt=tilt, uneven=uneven)
    assert built.seg and built.sr and len(built.overlay) >= 2
    _validate_all(st, built)


@pytest.mark.parametrize("tilt,uneven", [(0.0, False), (18.0, True)])
def test_seg_read_back_matches_masks_and_geometry(tmp_path, tilt, uneven):
    st, sources, result, built = _build(tmp_path, tilt=tilt, uneven=uneven)
    seg = hd.seg.segread(built.seg)
    ct = {ds.SOPInstanceUID: ds for ds in sources}
    # Segments: the two subtypes present + both ventricles, coded as documented.
    labels = {d.segment_number: d.segment_label for d in seg.SegmentSequence}
    assert sorted(labels.values()) == sorted(["Subdural hematoma", "Intraparenchymal hematoma",
                                              "Left lateral ventricle", "Right lateral ventricle"])
    for desc in seg.SegmentSequence:
        ptype = desc.SegmentedPropertyTypeCodeSequence[0]
        if "ventricle" in desc.SegmentLabel:
            assert ptype.CodeValue == "66720007" and ptype.CodingSchemeDesignator == "SCT"
            side = ptype.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
            assert side == ("7771000" if desc.SegmentLabel.startswith("Left") else "24028007")
        else:
            assert ptype.CodeValue == "50960005"
            assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        algo = desc.SegmentationAlgorithmIdentificationSequence[0]
        assert result.models[1].sha256 in str(algo.AlgorithmParameters)
        assert algo.AlgorithmName == "ichnode-segment"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == st.study_uid
    # Every frame sits exactly on the CT slice it references (also when tilted and unevenly spaced),
    # and carries that slice's mask.
    number_by_label = {v: k for k, v in labels.items()}
    k_of = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in ct
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in ct[ref].ImagePositionPatient], atol=1e-3)
        segno = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        key = {"Subdural hematoma": "subdural", "Intraparenchymal hematoma": "intraparenchymal",
               "Left lateral ventricle": "ventricle_left",
               "Right lateral ventricle": "ventricle_right"}[labels[segno]]
        k = k_of[ref]
        if key in SUBTYPES:
            want = st.masks["hematoma"][k] & (st.masks["hematoma_subtype"][k] == 1 + SUBTYPES.index(key))
        else:
            want = st.masks[key][k]
        assert np.array_equal(frames[n].astype(bool), want), (labels[segno], k)
    assert number_by_label["Left lateral ventricle"] > number_by_label["Intraparenchymal hematoma"]
    orient = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    assert np.allclose(orient, [float(v) for v in sources[0].ImageOrientationPatient])


def test_sr_content_read_back(tmp_path):
    st, sources, result, built = _build(tmp_path)
    sr = hd.sr.srread(built.sr)
    seg = hd.seg.segread(built.seg)
    seg_numbers = {d.segment_number for d in seg.SegmentSequence}
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = sr.content
    # Per-label presence + probability groups.
    planar_free = report.get_image_measurement_groups()
    by_id = {g.tracking_identifier: g for g in planar_free}
    for label in ("any", *SUBTYPES):
        g = by_id[f"ICH {label}"]
        prob = g.get_measurements(name=codes.PROBABILITY)[0]
        assert prob.value == pytest.approx(result.findings[label].probability, abs=1e-4)
        assert prob.unit == codes.UNIT_NONE
        qual = g.get_qualitative_evaluations(name=codes.PRESENCE)[0]
        assert qual.value == (codes.PRESENT if result.findings[label].present else codes.ABSENT)
        assert g.finding_type == (codes.INTRACRANIAL_HEMORRHAGE if label == "any" else codes.HEMORRHAGE)
    # Summary: total volume, ABC/2 and midline shift with UCUM units.
    summary = by_id["Hematoma summary"]
    vols = summary.get_measurements(name=codes.VOLUME)
    assert {round(m.value, 2) for m in vols} == {round(result.hematoma_volume_ml, 2), round(result.hematoma_abc2_ml, 2)}
    assert all(m.unit == codes.UNIT_ML for m in vols)
    mls = summary.get_measurements(name=codes.MIDLINE_SHIFT)[0]
    assert mls.value == pytest.approx(result.midline_shift_mm) and mls.unit == codes.UNIT_MM
    # Volumetric groups reference existing SEG segments and carry their volumes.
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == len(built.segments) == 4
    expected = {s["number"]: s["volume_ml"] for s in built.segments}
    for g in volumetric:
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        (number,) = ref.referenced_segment_numbers
        assert number in seg_numbers
        vol = g.get_measurements(name=codes.VOLUME)[0]
        assert vol.value == pytest.approx(expected[number], abs=0.01)
        assert vol.unit == codes.UNIT_ML
    # The ventricle volume from the SEG segment equals the truth (voxels x voxel volume).
    left = next(s for s in built.segments if s["key"] == "ventricle_left")
    per_slice = slice_volumes_ml(sources)
    truth = float((st.masks["ventricle_left"].sum(axis=(1, 2)) * per_slice).sum())
    assert left["volume_ml"] == pytest.approx(truth, abs=0.01)
    # Algorithm identification with the weights checksum.
    texts = _texts(built.sr)
    assert f"weights_sha256={result.models[1].sha256}" in texts
    assert f"weights_sha256={result.models[0].sha256}" in texts
    # NER context: anticoagulant flag coded, entities as text.
    ctx = by_id["Clinical context (NER)"]
    assert ctx.get_qualitative_evaluations(name=codes.ANTICOAGULANT)[0].value == codes.PRESENT
    assert "ANTICOAGULANT: warfarin 5 mg" in texts and "GCS: 13" in texts
    # Evidence: the SR references the CT instances and the SEG in the same study.
    refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in refs and {ds.SOPInstanceUID for ds in sources} <= refs


def test_empty_findings_no_seg_and_sr_says_so(tmp_path):
    st, sources, result, built = _build(tmp_path, empty=True, entities=None)
    assert built.seg is None and built.sr is not None
    assert any("no segment" in n for n in built.notes)
    _validate_all(st, built)
    sr = hd.sr.srread(built.sr)
    assert any("No hematoma segmented" in t for t in _texts(built.sr))
    report = sr.content
    assert report.get_volumetric_roi_measurement_groups() == []
    assert len(built.overlay) == 1  # summary slice only


def test_not_analysed_sr_and_summary(tmp_path):
    st = write_ct_series(tmp_path / "ct")
    sources = load_sources(st.paths)
    from models.results import AnalysisResult

    result = AnalysisResult(status="not_analysed", reason="model error: weights checksum mismatch")
    built = build_results(sources, result, None, None, tmp_path / "results", uid_seed="na",
                          reason=result.reason)
    assert built.seg is None and len(built.overlay) == 1
    _validate_all(st, built)
    sr = hd.sr.srread(built.sr)
    assert "NOT ANALYSED" in sr.SeriesDescription
    report = sr.content
    g = report.get_image_measurement_groups()[0]
    assert g.get_qualitative_evaluations(name=codes.PRESENCE)[0].value == codes.PRESENCE_UNDETERMINED
    assert any("weights checksum mismatch" in t for t in _texts(built.sr))
    ov = pydicom.dcmread(built.overlay[0])
    assert ov.BurnedInAnnotation == "YES" and ov.StudyInstanceUID == st.study_uid


def test_overlay_contours_on_brain_window(tmp_path):
    st, sources, result, built = _build(tmp_path)
    contour_slices = [pydicom.dcmread(p) for p in built.overlay[1:]]
    k_with_blood = set(np.flatnonzero(st.masks["hematoma"].any(axis=(1, 2))))
    assert len(contour_slices) == len(k_with_blood)
    ct = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    red = np.array(codes.COLOURS["intraparenchymal"], np.uint8)
    for ov in contour_slices:
        k = ct[ov.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert k in k_with_blood
        px = ov.pixel_array
        is_red = np.all(px == red, axis=-1)
        ipm = st.masks["hematoma"][k] & (st.masks["hematoma_subtype"][k] == 4)
        if ipm.any():
            assert is_red.any() and not is_red[~ipm].any()  # contour only on the segment
        # Brain (~32 HU) is mid-grey in the L40/W80 window, air black.
        assert px[0, 0].tolist() == [0, 0, 0]
