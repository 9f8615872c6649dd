"""Helpers for the intake tests and the ingest benchmark: a synthetic head CT and real DICOM peers.

``make_head_ct`` writes a multi-series head CT (512x512 int16 slices with consistent geometry) with
pydicom; ``storescp`` / ``storescu`` / ``echoscu`` run DCMTK on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass(frozen=True)
class SeriesSpec:
    description: str
    slices: int
    thickness: float
    kernel: str
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")


DEFAULT_SERIES = (
    SeriesSpec("HEAD 5mm STD", 8, 5.0, "H30s"),
    SeriesSpec("HEAD 2.5mm BONE", 6, 2.5, "H70h"),
    SeriesSpec("TOPOGRAM", 1, 1.0, "T20f", ("ORIGINAL", "PRIMARY", "LOCALIZER")),
)


def _head_slice(z_mm: float, size: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    # Ellipsoid head: air -1000, skull ring 1200, brain ~35 HU with noise.
    c = (np.arange(size) - size / 2 + 0.5) * spacing
    yy, xx = np.meshgrid(c, c, indexing="ij")
    scale = max(0.0, 1.0 - (z_mm / 90.0) ** 2) ** 0.5
    a, b = 75.0 * scale + 1e-3, 95.0 * scale + 1e-3
    r = (xx / a) ** 2 + (yy / b) ** 2
    img = np.full((size, size), -1000, np.int16)
    img[r <= 1.0] = 1200
    inner = (xx / (a - 6)) ** 2 + (yy / (b - 6)) ** 2 <= 1.0 if a > 6 else np.zeros_like(r, bool)
    img[inner] = 35
    img += rng.integers(-8, 9, img.shape, dtype=np.int16)
    return img


def make_head_ct(folder: Path, *, series: tuple[SeriesSpec, ...] = DEFAULT_SERIES,
                 size: int = 512, study_uid: str | None = None, seed: int = 0) -> list[Path]:
    """Write a multi-series head CT study; returns the file paths (one study)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    spacing = 0.48828125
    paths = []
    for s_no, spec in enumerate(series, start=1):
        series_uid = generate_uid()
        for k in range(spec.slices):
            z = -40.0 + k * spec.thickness
            ds = _ct_dataset(study_uid, series_uid, s_no, k + 1, spec, z, size, spacing)
            ds.PixelData = _head_slice(z, size, spacing, rng).tobytes()
            path = folder / f"s{s_no:02d}_{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def _ct_dataset(study_uid: str, series_uid: str, series_no: int, number: int, spec: SeriesSpec,
                z: float, size: int, spacing: float) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^HEAD", "PH0001", "", "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer = "CT", "ichnode-tests"
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription, ds.SeriesDescription = "CT HEAD W/O CONTRAST", spec.description
    ds.ProtocolName = "Head routine"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = series_no, number, 1
    ds.ImageType = list(spec.image_type)
    ds.ConvolutionKernel = spec.kernel
    ds.SliceThickness = spec.thickness
    ds.KVP, ds.GantryDetectorTilt = 120, 0
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-size * spacing / 2, -size * spacing / 2, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    return ds


def compress_rle(paths: list[Path], folder: Path) -> list[Path]:
    """RLE Lossless copies of the files (pydicom's encoder)."""
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        ds = dcmread(p)
        ds.compress(RLELossless)
        target = folder / p.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a DICOM file (after the file meta group)."""
    from pydicom.filereader import read_preamble, _read_file_meta_info

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


# ---------------------------------------------------------------------- DCMTK peers
def storescu(port: int, files: list[Path] | list[str], *, aec: str = "ICHNODE",
             aet: str = "STORESCU", extra: tuple[str, ...] = (),
             timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


# storescu proposes a compressed transfer syntax only when told which (one per run); with -R
# it proposes only the SOP classes of the files given.
PROPOSE_FLAG = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
}


def storescu_as_stored(port: int, files: list[Path], **kwargs) -> list[subprocess.CompletedProcess]:
    """storescu runs that send each file in its own (possibly compressed) transfer syntax."""
    from pydicom.filereader import read_file_meta_info

    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(str(read_file_meta_info(f).TransferSyntaxUID), []).append(Path(f))
    return [storescu(port, group, extra=("-R", PROPOSE_FLAG.get(ts, "-xe")), **kwargs)
            for ts, group in groups.items()]


def echoscu(port: int, *, aec: str = "ICHNODE", aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=DCMTK_ENV)


@contextmanager
def storescp(port: int, folder: Path, *, aet: str = "PACS",
             extra: tuple[str, ...] = ("+xa",)) -> Iterator[subprocess.Popen]:
    """DCMTK storescp on 127.0.0.1:port writing into ``folder`` (+xa: any transfer syntax)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(folder), *extra, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def have_dcmtk() -> bool:
    return all(shutil.which(t) for t in ("storescu", "storescp", "echoscu"))


# ---------------------------------------------------------------------- our node
def node_settings(tmp_path: Path, **sections):  # noqa: ANN201 - Settings
    """Settings with the storage under tmp_path; ``sections`` override/extend whole sections."""
    from node.config import Settings

    storage = {"root": tmp_path / "var", "min_free_mb": 0, **sections.pop("storage", {})}
    return Settings(storage=storage, **sections)


@contextmanager
def running_node(settings, index=None) -> Iterator:  # noqa: ANN001
    """A started DicomService on a free port (yields the service; .index is the index)."""
    from node.index import open_index
    from node.scp import DicomService

    own = index is None
    index = index or open_index(settings)
    service = DicomService(settings, index, port=0).start()
    try:
        yield service
    finally:
        service.stop()
        if own:
            index.dispose()
