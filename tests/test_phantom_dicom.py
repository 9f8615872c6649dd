"""Phantom DICOM series and label files: geometry round trip, encoding, validity, determinism."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.phantom import write_dicom_series, write_labels
from models.phantom.dicom import write_localizer
from phantom_helpers import study


def _affine_from_files(datasets):
    """Rebuild the (i, j, k) -> LPS affine from IPP/IOP/PixelSpacing, sorted along the normal."""
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    datasets = sorted(datasets, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    ipp = np.array([d.ImagePositionPatient for d in datasets], float)
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)  # row spacing, column spacing
    aff = np.eye(4)
    aff[:3, 0] = row * dc
    aff[:3, 1] = col * dr
    aff[:3, 2] = (ipp[-1] - ipp[0]) / (len(ipp) - 1)
    aff[:3, 3] = ipp[0]
    return aff, datasets, ipp


@pytest.mark.parametrize("signed", [False, True])
def test_geometry_and_hu_round_trip_with_tilt(tmp_path, signed):
    st = study(51, ("subdural",), tilt_deg=17.0, yaw_deg=8.0, pixel_signed=signed)
    paths = write_dicom_series(st, tmp_path / "ct")
    assert len(paths) == st.volume.hu.shape[0]
    dss = [pydicom.dcmread(p) for p in paths]
    aff, dss, ipp = _affine_from_files(dss)
    assert np.allclose(aff, st.volume.affine, atol=1e-4)
    # tilt: IOP column tilted, IPPs one table step apart along patient z only
    assert float(dss[0].GantryDetectorTilt) == pytest.approx(17.0)
    col = np.array(dss[0].ImageOrientationPatient[3:], float)
    assert col == pytest.approx([0, np.cos(np.radians(17)), -np.sin(np.radians(17))], abs=1e-6)
    steps = np.diff(ipp, axis=0)
    assert np.allclose(steps[:, :2], 0, atol=1e-4)
    assert np.allclose(steps[:, 2], st.spec.slice_increment_mm, atol=1e-4)
    assert float(dss[0].SliceThickness) == pytest.approx(5.0)
    for ds, k in zip(dss, range(len(dss))):
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, st.volume.hu[k])
    ds = dss[0]
    assert ds.PixelRepresentation == int(signed) and ds.BitsStored == (16 if signed else 12)
    assert ds.Modality == "CT" and ds.ConvolutionKernel == st.volume.meta["kernel"]
    assert ds.FrameOfReferenceUID and ds.StudyInstanceUID and ds.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)


def test_same_seed_same_bytes(tmp_path):
    from models.phantom import PhantomSpec, generate_study

    spec = dict(seed=52, subtypes=("intraventricular",), matrix=128, slice_thickness_mm=5.0)
    a = write_dicom_series(generate_study(PhantomSpec(**spec)), tmp_path / "a")
    b = write_dicom_series(generate_study(PhantomSpec(**spec)), tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = write_dicom_series(generate_study(PhantomSpec(**{**spec, "seed": 53})), tmp_path / "c")
    assert pydicom.dcmread(c[0]).StudyInstanceUID != pydicom.dcmread(a[0]).StudyInstanceUID


def _errors(path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("Error")]


def test_dciodvfy_and_dcmdump_accept_soft_bone_and_localizer(tmp_path):
    st = study(54, ("epidural",), language="zh")
    soft = write_dicom_series(st, tmp_path / "soft")
    bone = write_dicom_series(st, tmp_path / "bone", kernel="bone")
    loc = write_localizer(st, tmp_path / "loc")
    for path in (soft[0], soft[len(soft) // 2], bone[3], loc):
        assert _errors(path) == [], path
    out = subprocess.run(["dcmdump", "+P", "0008,0060", "+P", "0018,1210", str(bone[3])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "CT" in out.stdout
    b, s = pydicom.dcmread(bone[3]), pydicom.dcmread(soft[3])
    assert b.SeriesInstanceUID != s.SeriesInstanceUID
    assert b.FrameOfReferenceUID == s.FrameOfReferenceUID
    assert b.ConvolutionKernel != s.ConvolutionKernel
    assert b.ImagePositionPatient == s.ImagePositionPatient
    # the bone kernel is sharper and noisier: more high-frequency energy inside the brain
    k = len(soft) // 2
    brain = ndimage.binary_erosion(st.masks["brain"][k], iterations=4)[:, 1:]
    bk, sk = (pydicom.dcmread(p[k]).pixel_array.astype(float) for p in (bone, soft))
    hf = lambda a: np.abs(np.diff(a, axis=1))[brain].mean()  # noqa: E731
    assert hf(bk) > 2.0 * hf(sk)
    lds = pydicom.dcmread(loc)
    assert "LOCALIZER" in lds.ImageType
    # Chinese clinical note, declared as UTF-8
    assert s.SpecificCharacterSet == "ISO_IR 192"
    assert "GCS" in s.AdditionalPatientHistory and any(ord(ch) > 0x4E00
                                                       for ch in s.AdditionalPatientHistory)
    assert s.RequestAttributesSequence[0].ReasonForTheRequestedProcedure


def test_identity_overrides_and_english_note(tmp_path):
    st = study(55, language="en")
    paths = write_dicom_series(st, tmp_path / "ct", patient_name="DOE^JANE", patient_id="X123",
                               accession="ACC9", study_uid="1.2.3.4.5", series_number=7)
    ds = pydicom.dcmread(paths[0])
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == ("DOE^JANE", "X123", "ACC9")
    assert ds.StudyInstanceUID == "1.2.3.4.5" and ds.SeriesNumber == 7
    note = ds.AdditionalPatientHistory
    assert "BP" in note and "GCS" in note and ("onset" in note)


def test_labels_npz_nifti_and_truth_json(tmp_path):
    st = study(56, ("intraparenchymal", "intraventricular"))
    paths = write_labels(st, tmp_path / "lab")
    with np.load(paths["masks"]) as data:
        assert data["hematoma"].shape == st.volume.hu.shape
        assert np.array_equal(data["intraparenchymal"], st.masks["intraparenchymal"])
        sub = data["hematoma_subtype"]
        assert set(np.unique(sub)) <= {0, 4, 5} and (sub > 0).sum() == data["hematoma"].sum()
        assert np.allclose(data["affine"], st.volume.affine)
    truth = json.loads(paths["truth"].read_text())
    assert truth["hematoma_volume_ml"] == st.truth["hematoma_volume_ml"]
    assert truth["clinical_note"]["facts"]["gcs"] <= 15
    import nibabel as nib

    nii = write_labels(st, tmp_path / "nii", fmt="nifti")
    img = nib.load(nii["hematoma"])
    assert img.shape == st.volume.hu.shape[::-1]
    assert int(np.asarray(img.dataobj).sum()) == int(st.masks["hematoma"].sum())
