"""Write a phantom study as a DICOM CT Image series (and optionally a localizer).

Encoding: little-endian explicit VR, uncompressed. Pixels are stored either unsigned
(PixelRepresentation 0, BitsStored 12, RescaleIntercept -1024: stored = HU + 1024) or signed
(PixelRepresentation 1, BitsStored 16, RescaleIntercept -1024 as many GE scanners write), as
the spec's ``pixel_signed`` says; RescaleSlope is 1. Geometry: IOP row (1,0,0), column
(0, cos t, -sin t) for gantry tilt t; IPP of slice k = affine @ (0, 0, k, 1) so consecutive
slices are one table step apart along patient z; GantryDetectorTilt = t in degrees.
Every UID is derived from the seed (same seed -> same files, byte for byte).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from models.phantom.history import clinical_note
from models.phantom.spec import rng_for

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1452.1"  # ichnode phantom writer (2.25-free root)
IMPLEMENTATION_VERSION = "ICHNODE_PH_01"


_UID_NAMESPACE = uuid.UUID("6f1c8c52-3a0e-4f5e-9a57-1c0de0000000")  # ichnode phantoms


def seed_uid(seed: int, *parts) -> str:
    """A deterministic UID in the 2.25 (UUID) form from the seed and a role.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and returns a random
    UUID, so the name-based UUID is built here.)"""
    name = "|".join(["ichnode-phantom", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _fmt(v: float) -> str:
    """Decimal String value (<= 16 chars)."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def _study_datetime(seed: int) -> dt.datetime:
    r = rng_for(seed, "dates")
    base = dt.datetime(2023, 1, 1) + dt.timedelta(days=int(r.integers(0, 700)))
    return base + dt.timedelta(seconds=int(r.integers(0, 86400)))


def _base_dataset(study, *, patient_name, patient_id, accession, study_uid, series_uid,
                  series_number, description, charset_needed) -> Dataset:
    s = study.spec
    meta = study.volume.meta
    when = _study_datetime(s.seed)
    birth = dt.date(when.year - s.age_years, 1, 1) + dt.timedelta(days=int(s.seed % 300))
    note = clinical_note(s)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192" if charset_needed or s.language == "zh" else "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = (when + dt.timedelta(seconds=40 + series_number)).strftime("%H%M%S")
    ds.AcquisitionTime = (when + dt.timedelta(seconds=30)).strftime("%H%M%S")
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = accession if accession is not None else f"A{s.seed:08d}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer = meta["manufacturer"]
    ds.InstitutionName = "ichnode phantom hospital"
    ds.ReferringPhysicianName = "EMERGENCY^DOCTOR"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = meta["model"]
    ds.PatientName = patient_name if patient_name is not None else f"PHANTOM^{s.seed}"
    ds.PatientID = patient_id if patient_id is not None else f"PH{s.seed:08d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = s.sex
    ds.PatientAge = f"{s.age_years:03d}Y"
    ds.AdditionalPatientHistory = note["text"]
    ds.BodyPartExamined = "HEAD"
    ds.DeviceSerialNumber = f"{rng_for(s.seed, 'serial').integers(10000, 99999)}"
    ds.SoftwareVersions = "ichnode-phantom-1"
    ds.ProtocolName = "Routine Head"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid or seed_uid(s.seed, "study")
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{s.seed % 100000}"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = seed_uid(s.seed, "frame")
    ds.PositionReferenceIndicator = ""
    req = Dataset()
    req.RequestedProcedureID = f"RP{s.seed % 100000}"
    req.ScheduledProcedureStepID = f"SPS{s.seed % 100000}"
    req.ReasonForTheRequestedProcedure = note["reason"]
    req.RequestedProcedureDescription = "CT HEAD WO CONTRAST"
    ds.RequestAttributesSequence = Sequence([req])
    return ds


def _ct_attributes(ds: Dataset, study, kernel_name: str) -> None:
    s = study.spec
    g = study.geometry
    ds.KVP = _fmt(s.kvp)
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _fmt(g.pixel * g.shape[2])
    ds.DistanceSourceToDetector = "1040"
    ds.DistanceSourceToPatient = "570"
    ds.GantryDetectorTilt = _fmt(s.tilt_deg)
    ds.TableHeight = _fmt(150.0 - g.centre[1])
    ds.RotationDirection = "CW"
    ds.ExposureTime = str(int(round(s.exposure_time_ms)))
    ds.XRayTubeCurrent = str(int(round(s.ma)))
    ds.Exposure = str(int(round(s.ma * s.exposure_time_ms / 1000.0)))
    ds.FilterType = "HEAD"
    ds.GeneratorPower = str(int(round(s.kvp * s.ma / 1000.0)))
    ds.FocalSpots = ["0.7"]
    ds.ConvolutionKernel = kernel_name
    ds.RevolutionTime = float(s.exposure_time_ms / 1000.0)
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    phantom = Dataset()
    phantom.CodeValue = "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Head Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = Sequence([phantom])
    ds.CTDIvol = round(0.15 * s.ma * s.exposure_time_ms / 1000.0 * (s.kvp / 120.0) ** 2.5, 2)


def _pixels(hu: np.ndarray, signed: bool) -> tuple[bytes, dict]:
    stored = hu.astype(np.int32) + 1024
    if signed:
        arr = stored.astype(np.int16)
        attrs = dict(BitsStored=16, HighBit=15, PixelRepresentation=1)
    else:
        arr = np.clip(stored, 0, 4095).astype(np.uint16)
        attrs = dict(BitsStored=12, HighBit=11, PixelRepresentation=0)
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes(), attrs


def write_dicom_series(study, out_dir, *, patient_name: str | None = None,
                       patient_id: str | None = None, accession: str | None = None,
                       study_uid: str | None = None, series_number: int | None = None,
                       kernel: str | None = None, description: str | None = None) -> list[Path]:
    """Write one CT series (one file per slice, ``IM%04d.dcm`` in ``out_dir``).

    ``kernel`` "bone" writes the bone-kernel reconstruction of the same acquisition (same
    frame of reference, its own series); default is the study's own look.
    """
    s = study.spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    look = kernel or s.kernel
    if look == s.kernel:
        hu = study.volume.hu
        kernel_name = study.volume.meta["kernel"]
    else:
        hu = reconstruct(study, look)
        from models.phantom.spec import VENDORS

        soft, bone = VENDORS[s.vendor][2], VENDORS[s.vendor][3]
        kernel_name = (bone if look == "bone" else soft)[0]
    if series_number is None:
        series_number = 2 if look == "soft" else 3
    g = study.geometry
    series_uid = seed_uid(s.seed, "series", look, series_number, study_uid or "")
    desc = description or f"HEAD {s.slice_thickness_mm:g}mm {kernel_name}"
    base = _base_dataset(study, patient_name=patient_name, patient_id=patient_id,
                         accession=accession, study_uid=study_uid, series_uid=series_uid,
                         series_number=series_number, description=desc,
                         charset_needed=not all(ord(ch) < 128 for ch in
                                                (patient_name or "") + (patient_id or "")))
    _ct_attributes(base, study, kernel_name)
    a = g.affine
    row = a[:3, 0] / np.linalg.norm(a[:3, 0])
    col = a[:3, 1] / np.linalg.norm(a[:3, 1])
    normal = np.cross(row, col)
    k, nj, ni = hu.shape
    paths = []
    for kk in range(k):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = seed_uid(s.seed, "image", series_uid, kk)
        ds.InstanceNumber = kk + 1
        ipp = a[:3] @ np.array([0.0, 0.0, kk, 1.0])
        ds.ImagePositionPatient = [_fmt(v) for v in ipp]
        ds.ImageOrientationPatient = [_fmt(v) for v in (*row, *col)]
        ds.SliceLocation = _fmt(float(ipp @ normal))
        ds.SliceThickness = _fmt(s.slice_thickness_mm)
        ds.PixelSpacing = [_fmt(g.pixel), _fmt(g.pixel)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated = 16
        data, attrs = _pixels(hu[kk], bool(s.pixel_signed))
        for key, v in attrs.items():
            setattr(ds, key, v)
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "600"] if look == "soft" else ["600", "40"]
        ds.WindowWidth = ["80", "2800"] if look == "soft" else ["2800", "80"]
        ds.PixelData = data
        ds["PixelData"].VR = "OW"
        ds.InstanceCreationDate = ds.ContentDate
        ds.InstanceCreationTime = ds.ContentTime
        paths.append(_save(ds, out / f"IM{kk + 1:04d}.dcm"))
    return paths


def reconstruct(study, look: str) -> np.ndarray:
    """Another kernel's image of the same acquisition (from the model grid)."""
    from models.phantom.physics import finish

    if study.canvas is None:
        raise ValueError("this study has no model grid (kept by generate_study) to reconstruct")
    return finish(study.canvas, study.spec, kernel=look, salt=":" + look)


def write_localizer(study, out_dir, *, series_number: int = 1, **ids) -> Path:
    """A lateral scout (ImageType LOCALIZER): line integrals of attenuation through the head,
    a projection and not an axial slice (for series-selection tests)."""
    s = study.spec
    g = study.geometry
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mu = np.clip(study.volume.hu.astype(np.float32) + 1000.0, 0, None) / 1000.0
    proj = mu.sum(axis=2) * g.pixel / 10.0  # (k, j): line integral along x, in cm water
    # rows = patient z (top = superior), columns = patient y (anterior -> posterior)
    img = proj[::-1]
    rep = max(1, int(round(g.increment / g.pixel)))
    img = np.repeat(img, rep, axis=0)
    img = np.clip(img / max(img.max(), 1e-6) * 3000 - 1024, -1024, 3071).astype(np.int16)
    series_uid = seed_uid(s.seed, "localizer", series_number)
    ds = _base_dataset(study, patient_name=ids.get("patient_name"),
                       patient_id=ids.get("patient_id"), accession=ids.get("accession"),
                       study_uid=ids.get("study_uid"), series_uid=series_uid,
                       series_number=series_number, description="Topogram 0.6 T20s",
                       charset_needed=False)
    _ct_attributes(ds, study, study.volume.meta["kernel"])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.GantryDetectorTilt = "0"
    ds.SOPInstanceUID = seed_uid(s.seed, "localizer-image", series_uid)
    ds.InstanceNumber = 1
    # first pixel: top slice, most anterior image row, on the image's centre column
    a = g.affine
    centre_i = (g.shape[2] - 1) / 2
    top = a[:3] @ np.array([centre_i, 0.0, g.shape[0] - 1, 1.0])
    ds.ImagePositionPatient = [_fmt(v) for v in top]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.SliceThickness = _fmt(s.slice_thickness_mm)
    # rows step down one table increment / rep; columns step along patient y
    ds.PixelSpacing = [_fmt(g.increment / rep), _fmt(abs(a[1, 1]))]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 16
    data, attrs = _pixels(img, bool(s.pixel_signed))
    for key, v in attrs.items():
        setattr(ds, key, v)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"  # a projection is not in HU
    ds.PixelData = data
    ds["PixelData"].VR = "OW"
    return _save(ds, out / "LOC0001.dcm")


def _save(ds: Dataset, path: Path) -> Path:
    """Write a CT image as a Part 10 file (Explicit VR Little Endian) with our implementation UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=True)
    return path
