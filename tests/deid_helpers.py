"""Test helpers of the deid area: CT series full of identity in the places real headers hide it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass
class Identity:
    """What must never reach a gpu worker or a research copy."""

    patient_name: str = "Doe^Jonathan^Q"
    patient_id: str = "MRN-7731942"
    birth_date: str = "19530417"
    accession: str = "ACC-20260988"
    institution: str = "Saint Example Hospital"
    referring: str = "Smith^Alice"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)
    ref_uid: str = field(default_factory=generate_uid)
    other_id: str = "OTHER-55120"

    def strings(self) -> list[str]:
        """Every identifying string, each part of names too (a leak of 'Jonathan' counts)."""
        parts = [self.patient_name, self.patient_id, self.birth_date, self.accession,
                 self.institution, self.referring, self.study_uid, self.series_uid,
                 self.frame_uid, self.ref_uid, self.other_id]
        parts += self.patient_name.split("^") + self.referring.split("^")[:1]
        return [p for p in parts if len(p) >= 4]


def ct_dataset(identity: Identity, k: int, pixels: np.ndarray, affine: np.ndarray,
               sop_uid: str) -> Dataset:
    """One CT slice with identity in top-level, nested and private attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.FrameOfReferenceUID = identity.frame_uid
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = "M"
    ds.PatientAge = "072Y"
    ds.PatientWeight = "81"
    ds.AccessionNumber = identity.accession
    ds.InstitutionName = identity.institution
    ds.InstitutionAddress = "1 Example Road, Springfield"
    ds.ReferringPhysicianName = identity.referring
    ds.OperatorsName = "Tech^Bob"
    ds.StudyDate = "20260315"
    ds.SeriesDate = "20260315"
    ds.AcquisitionDate = "20260315"
    ds.ContentDate = "20260315"
    ds.StudyTime = "101500"
    ds.AcquisitionDateTime = "20260315101502.123456"
    ds.StudyID = "S" + identity.accession[-5:]
    ds.StudyDescription = f"CT HEAD for {identity.patient_name.split('^')[0]}"
    ds.SeriesDescription = "HEAD 5mm"
    ds.ImageComments = f"pt {identity.patient_id}"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = "H31s"
    ds.KVP = "120"
    ds.SliceThickness = f"{np.linalg.norm(affine[:3, 2]):.3f}"
    ds.InstanceNumber = k + 1
    other = Dataset()
    other.PatientID = identity.other_id
    other.IssuerOfPatientID = "HOSP"
    ds.OtherPatientIDsSequence = Sequence([other])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = identity.ref_uid
    ds.ReferencedImageSequence = Sequence([ref])
    req = Dataset()
    req.AccessionNumber = identity.accession
    req.RequestingPhysician = identity.referring
    ds.RequestAttributesSequence = Sequence([req])
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", identity.patient_name)
    block.add_new(0x11, "LO", identity.patient_id)
    row, col = affine[:3, 0], affine[:3, 1]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row / np.linalg.norm(row),
                                                       *col / np.linalg.norm(col))]
    pos = affine[:3, 3] + k * affine[:3, 2]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.PixelSpacing = [f"{np.linalg.norm(col):.4f}", f"{np.linalg.norm(row):.4f}"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    raw = np.clip(np.round(pixels) + 1024, 0, 4095).astype(np.uint16)
    ds.PixelData = raw.tobytes()
    return ds


def write_series(hu: np.ndarray, affine: np.ndarray, out_dir: Path,
                 identity: Identity | None = None) -> tuple[Identity, list[Path]]:
    """Write ``hu`` (k, j, i) as single-frame CT files, shuffled names so order is not implied."""
    identity = identity or Identity()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for k in range(hu.shape[0]):
        sop = generate_uid()
        ds = ct_dataset(identity, k, hu[k], affine, sop)
        path = out_dir / f"img{rng.integers(1e9):09d}_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return identity, paths


def box_head(shape=(40, 96, 96), spacing=(4.0, 2.4, 2.4)) -> tuple[np.ndarray, np.ndarray]:
    """A crude head (ellipsoid skull, brain, a nose bump): a stand-in where no phantom is needed."""
    k, j, i = np.indices(shape, dtype=np.float32)
    ck, cj, ci = shape[0] * 0.55, shape[1] / 2, shape[2] / 2
    r = np.sqrt(((k - ck) * spacing[0] / 80) ** 2 + ((j - cj) * spacing[1] / 95) ** 2
                + ((i - ci) * spacing[2] / 75) ** 2)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[r < 1.0] = 40
    hu[(r >= 0.90) & (r < 1.0)] = 1200
    hu[(r >= 1.0) & (r < 1.06)] = 30
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [-ci * spacing[2], -cj * spacing[1], -ck * spacing[0]]
    return hu, affine
