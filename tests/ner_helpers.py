"""Shared helpers of the NER tests: settings on a temp folder, DICOM files, HL7 messages, ports."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path

from node.config import Settings


def make_settings(root: Path, **sections) -> Settings:  # noqa: ANN003
    return Settings(storage={"root": root, "fsync": False}, **sections)


@lru_cache(maxsize=1)
def demo_model():
    from models.ner.inference import NerModel

    return NerModel()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ct_header(path: Path, *, study_uid: str, accession: str, patient_id: str,
                    history: str | None = None, reason: str | None = None) -> Path:
    """A small CT image file (8x8 pixels) with the given free-text attributes."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    if history:
        ds.AdditionalPatientHistory = history
    if reason:
        item = Dataset()
        item.ReasonForTheRequestedProcedure = reason
        ds.RequestAttributesSequence = [item]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def hl7_message(kind: str = "ORU^R01", *, patient_id: str | None = "P123",
                accession: str | None = "ACC1", lines: list[str] | None = None,
                nte: str | None = None, control_id: str = "MSG0001") -> str:
    """An HL7 v2.5 message with OBX TX lines (segments separated by CR)."""
    segs = [f"MSH|^~\\&|EMR|HOSP|ICHNODE|HOSP|20250101120000||{kind}|{control_id}|P|2.5"]
    segs.append(f"PID|1||{patient_id or ''}^^^HOSP^MR||DOE^JOHN")
    if kind.startswith("MDM"):
        segs.append(f"TXA|1|CN|TX|20250101120000|||||||||||{accession or ''}||||AU")
    else:
        segs.append(f"OBR|1||{accession or ''}|CTHEAD^CT head")
    for i, line in enumerate(lines or [], 1):
        segs.append(f"OBX|{i}|TX|NOTE^Clinical note||{line}||||||F")
    if nte:
        segs.append(f"NTE|1||{nte}")
    return "\r".join(segs) + "\r"
