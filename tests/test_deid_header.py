"""Header de-identification: PS3.15 Annex E Basic Profile with our options, keyed UID remapping."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime

import numpy as np
import pydicom
import pytest

from deid_helpers import box_head, write_series
from node.config import Settings
from workers.deid.header import BurnedInAnnotationError, HeaderDeidentifier, ProfileOptions
from workers.deid.pseudonyms import Pseudonymizer, load_secret

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    hu, affine = box_head((3, 24, 24))
    identity, paths = write_series(hu, affine, tmp_path_factory.mktemp("orig"))
    return identity, paths


def _deid(path, out, secret=SECRET, **opts):
    ds = pydicom.dcmread(path)
    original = ds.SOPInstanceUID
    HeaderDeidentifier(Pseudonymizer(secret), ProfileOptions(**opts)).deidentify(ds)
    ds.save_as(out, enforce_file_format=True)
    return original, pydicom.dcmread(out)


def test_no_identity_left_in_the_file_bytes(series, tmp_path):
    identity, paths = series
    original_sop, _ = _deid(paths[0], tmp_path / "a.dcm")
    data = (tmp_path / "a.dcm").read_bytes()
    for text in identity.strings() + [original_sop, "Tech", "Springfield", "ACME PRIVATE"]:
        assert text.encode() not in data, f"{text!r} survived de-identification"


def test_profile_marks_and_options(series, tmp_path):
    _, paths = series
    _, ds = _deid(paths[0], tmp_path / "a.dcm", defaced=True)
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113107", "113108", "113102"]
    assert all(len(v) <= 64 for v in ds.DeidentificationMethod)
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.BurnedInAnnotation == "NO"
    # Retain Patient Characteristics: sex, age, weight kept; birth date gone.
    assert (ds.PatientSex, ds.PatientAge, float(ds.PatientWeight)) == ("M", "072Y", 81.0)
    assert not ds.get("PatientBirthDate")
    # Basic profile removals (X), including nested identity and descriptions.
    for keyword in ("InstitutionName", "InstitutionAddress", "OperatorsName", "StudyDescription",
                    "SeriesDescription", "ImageComments", "OtherPatientIDsSequence",
                    "RequestAttributesSequence"):
        assert keyword not in ds, keyword
    assert not ds.AccessionNumber and not ds.ReferringPhysicianName
    assert not any(e.tag.is_private for e in ds.iterall())
    # Technical attributes the models need are untouched.
    assert ds.ConvolutionKernel == "H31s" and float(ds.KVP) == 120.0
    assert ds.ImagePositionPatient and ds.PixelSpacing


def test_dates_shifted_consistently_and_intervals_kept(series, tmp_path):
    identity, paths = series
    _, ds = _deid(paths[0], tmp_path / "a.dcm")
    shift = Pseudonymizer(SECRET).shift_days(identity.patient_id)
    assert -3650 <= shift <= -365
    study = datetime.strptime(ds.StudyDate, "%Y%m%d")
    assert (study - datetime(2026, 3, 15)).days == shift
    assert ds.AcquisitionDateTime[:8] == ds.StudyDate
    assert ds.AcquisitionDateTime[8:] == "101502.123456"
    assert ds.StudyTime == "101500"  # time of day kept with modified dates
    _, fixed = _deid(paths[0], tmp_path / "b.dcm", retain_modified_dates=True)
    assert fixed.StudyDate == ds.StudyDate  # deterministic
    _, removed = _deid(paths[0], tmp_path / "c.dcm", retain_modified_dates=False,
                       retain_patient_characteristics=False)
    assert not removed.get("StudyDate") and "AcquisitionDateTime" not in removed
    assert removed.LongitudinalTemporalInformationModified == "REMOVED"
    assert "PatientAge" not in removed and not removed.get("PatientSex")


def test_uids_remapped_consistently_across_a_study(series, tmp_path):
    identity, paths = series
    out = []
    for n, path in enumerate(paths):
        _, ds = _deid(path, tmp_path / f"{n}.dcm")
        out.append(ds)
    uid_form = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
    for ds in out:
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                    ds.FrameOfReferenceUID, ds.file_meta.MediaStorageSOPInstanceUID):
            assert uid_form.match(uid) and len(uid) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # The reference inside a sequence is remapped with the same key (stays resolvable).
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
            Pseudonymizer(SECRET).uid(identity.ref_uid)
    assert len({ds.StudyInstanceUID for ds in out}) == 1
    assert len({ds.SeriesInstanceUID for ds in out}) == 1
    assert len({ds.SOPInstanceUID for ds in out}) == len(paths)
    _, other_key = _deid(paths[0], tmp_path / "k.dcm", secret=b"another secret of 32 bytes......")
    assert other_key.StudyInstanceUID != out[0].StudyInstanceUID
    assert other_key.PatientID != out[0].PatientID


def test_burned_in_annotation_is_refused(series):
    _, paths = series
    ds = pydicom.dcmread(paths[0])
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError):
        HeaderDeidentifier(Pseudonymizer(SECRET)).deidentify(ds)
    ds = pydicom.dcmread(paths[0])
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN"]
    with pytest.raises(BurnedInAnnotationError):
        HeaderDeidentifier(Pseudonymizer(SECRET)).deidentify(ds)


def test_no_new_iod_errors(series, tmp_path):
    """dicom3tools' IOD verifier finds no error in the output that was not in the input."""
    _, paths = series
    _deid(paths[0], tmp_path / "a.dcm", defaced=True)

    def errors(path):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return {line for line in run.stderr.splitlines() if line.startswith("Error")}

    assert errors(tmp_path / "a.dcm") <= errors(paths[0])


def test_secret_generated_once_and_private(tmp_path):
    settings = Settings(storage={"root": tmp_path})
    first = load_secret(settings)
    assert len(first) == 64 and load_secret(settings) == first
    assert (tmp_path / "deid.secret").stat().st_mode & 0o077 == 0
    configured = Settings(storage={"root": tmp_path}, deid={"secret": "configured-key"})
    assert load_secret(configured) == b"configured-key"
    assert np.int64(Pseudonymizer(first).shift_days("x")) < 0
