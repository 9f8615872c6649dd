"""Results on a realistic phantom (models.phantom): 18 deg gantry tilt, two subtypes, the phantom's
ground-truth masks used as the model output. Volumes in SEG/SR must match the phantom's truth."""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pytest

from models.results import SUBTYPES, AnalysisResult, ModelInfo, SubtypeResult
from workers.report import codes
from workers.report.builder import build_results
from workers.report.sources import hu_slice, load_sources


@pytest.mark.slow
def test_phantom_tilted_study_results(tmp_path):
    from models.phantom import PhantomSpec, generate_study, write_dicom_series

    study = generate_study(PhantomSpec(seed=3, subtypes=("subdural", "intraventricular"), matrix=128,
                                       slice_thickness_mm=5.0, tilt_deg=18.0))
    paths = write_dicom_series(study, tmp_path / "ct")
    sources = load_sources(paths)
    # The masks' grid is the sorted original series (what the report step relies on).
    assert np.array_equal(np.stack([hu_slice(ds) for ds in sources]), study.volume.hu.astype(np.float32))
    m = study.masks
    subtype = np.zeros(study.volume.hu.shape, np.uint8)
    for n, name in enumerate(SUBTYPES, start=1):
        subtype[np.asarray(m[name], bool)] = n
    masks = {"hematoma": np.asarray(m["hematoma"], bool), "hematoma_subtype": subtype,
             "ventricle_left": np.asarray(m["ventricle_left"], bool),
             "ventricle_right": np.asarray(m["ventricle_right"], bool)}
    truth = study.truth
    present = set(truth["study_labels"]) if isinstance(truth["study_labels"], (list, tuple)) else {
        k for k, v in truth["study_labels"].items() if v}
    findings = {k: SubtypeResult(probability=0.9 if k in present else 0.05, present=k in present,
                                 threshold=0.5) for k in (*SUBTYPES, "any")}
    result = AnalysisResult(
        models=[ModelInfo(name="truth-segment", version="phantom", sha256="0" * 64)],
        findings=findings, hematoma_volume_ml=truth["hematoma_volume_ml"],
        midline_shift_mm=truth["midline_shift_mm"], ventricle_left_ml=truth["ventricle_left_ml"],
        ventricle_right_ml=truth["ventricle_right_ml"])
    built = build_results(sources, result, masks, None, tmp_path / "results", uid_seed="phantom",
                          priority="STAT")
    for path in built.paths:
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("Error")], path.name
    proc = subprocess.run(["dcentvfy", *map(str, paths), *map(str, built.paths)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Error" not in proc.stderr
    assert subprocess.run(["dsrdump", str(built.sr)], capture_output=True).returncode == 0

    seg = hd.seg.segread(built.seg)
    assert {d.segment_label for d in seg.SegmentSequence} == {
        "Subdural hematoma", "Intraventricular hemorrhage", "Left lateral ventricle", "Right lateral ventricle"}
    ivh = next(d for d in seg.SegmentSequence if d.segment_label == "Intraventricular hemorrhage")
    assert ivh.AnatomicRegionSequence[0].CodeValue == codes.SUBTYPE_SITE["intraventricular"].value
    by_key = {s["key"]: s["volume_ml"] for s in built.segments}
    # Segment volumes from the tilted, sheared grid agree with the phantom's own voxel volumes.
    voxel_ml = truth["voxel_ml"]
    for key, mask in (("ventricle_left", masks["ventricle_left"]), ("ventricle_right", masks["ventricle_right"])):
        assert by_key[key] == pytest.approx(mask.sum() * voxel_ml, rel=0.01)
    hem = by_key["subdural"] + by_key["intraventricular"]
    assert hem == pytest.approx(masks["hematoma"].sum() * voxel_ml, rel=0.01)
    # Every SEG frame lies on the plane of the CT slice it references.
    ct = {ds.SOPInstanceUID: ds for ds in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in ct[ref].ImagePositionPatient], atol=1e-3)
    report = hd.sr.srread(built.sr).content
    summary = next(g for g in report.get_image_measurement_groups() if g.tracking_identifier == "Hematoma summary")
    assert summary.get_measurements(name=codes.MIDLINE_SHIFT)[0].value == pytest.approx(
        round(truth["midline_shift_mm"], 2))
