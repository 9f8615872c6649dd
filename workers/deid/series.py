"""A defaced, de-identified DICOM copy of a series (what routing may send to research archives).

Each original instance keeps its header minus identity (:mod:`workers.deid.header`); its pixels
are replaced by the defaced slice. Pixels are re-encoded uncompressed (Explicit VR Little Endian)
as signed 16-bit HU with slope 1 and intercept 0: one simple encoding, whatever the source used
(compressed syntaxes, 12-bit unsigned quirk, padding values), so nothing of the original face can
hide in an encoding detail such as a padding value or a compressed frame left behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from workers.deid.header import HeaderDeidentifier

# Pixel-module attributes that describe the old encoding and would now be wrong.
_STALE_PIXEL_ATTRS = ("PixelPaddingValue", "PixelPaddingRangeLimit", "SmallestImagePixelValue",
                      "LargestImagePixelValue", "ExtendedOffsetTable",
                      "ExtendedOffsetTableLengths", "LossyImageCompression")


@dataclass
class CopiedInstance:
    k: int
    sop_instance_uid: str  # pseudonymous
    sop_class_uid: str
    path: Path


def slice_to_dataset(ds: pydicom.Dataset, hu_slice: np.ndarray) -> None:
    """Replace the pixel data of ``ds`` by ``hu_slice`` (HU), encoded as signed 16 bit."""
    if ds.file_meta.get("TransferSyntaxUID") == pydicom.uid.ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    arr = np.clip(np.round(hu_slice), -32768, 32767).astype(np.int16)
    for keyword in _STALE_PIXEL_ATTRS:
        if keyword in ds:
            del ds[keyword]
    ds.set_pixel_data(arr, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"


def write_copy(paths: list[Path], hu: np.ndarray, out_dir: Path,
               deidentifier: HeaderDeidentifier) -> list[CopiedInstance]:
    """Write ``paths[k]`` with pixels ``hu[k]`` and a de-identified header into ``out_dir``.

    ``paths`` must be in the volume's k order (the prepare step's ``series.json`` order).
    """
    if len(paths) != hu.shape[0]:
        raise ValueError(f"{len(paths)} files for {hu.shape[0]} slices")
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        if (int(ds.Rows), int(ds.Columns)) != hu.shape[1:]:
            raise ValueError(f"slice {k}: matrix {ds.Rows}x{ds.Columns} does not match the volume")
        slice_to_dataset(ds, hu[k])
        deidentifier.deidentify(ds)
        target = out_dir / f"{k:05d}.dcm"  # no original file name (it may hold identity)
        tmp = target.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(target)
        copied.append(CopiedInstance(k, str(ds.SOPInstanceUID), str(ds.SOPClassUID), target))
    return copied
