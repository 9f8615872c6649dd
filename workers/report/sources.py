"""The original CT instances the results refer to, in the masks' slice order.

Masks are on the (k, j, i) grid of the position-sorted slices (sorted along the slice-stack
direction, never by Instance Number). We sort the source datasets the same way here, so frame k
of the SEG is written against the instance that produced slice k, also for gantry-tilted series
(where the stack direction is not the image normal) and uneven spacing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class SourceError(Exception):
    """The original instances cannot be used (missing, unreadable, mixed series)."""


def read_series_json(path: Path, spool_dir: Path) -> list[Path]:
    """Spool paths of the selected series from ``series.json`` (written by the prepare step).

    Accepts a list of slice entries or a mapping with ``slices``/``instances``; each entry a
    path string or a mapping with ``path`` (absolute, or relative to the spool folder).
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("slices") or data.get("instances") or data.get("files") or []
    paths = []
    for entry in data:
        p = entry if isinstance(entry, str) else entry.get("path") or entry.get("spool_path")
        if not p:
            raise SourceError(f"{path.name}: slice entry without a path")
        p = Path(p)
        paths.append(p if p.is_absolute() else spool_dir / p)
    return paths


def load_sources(paths: list[Path]) -> list[Dataset]:
    """Read the instances (with pixels) and sort them along the slice-stack direction."""
    if not paths:
        raise SourceError("no source instances")
    try:
        datasets = [pydicom.dcmread(p) for p in paths]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise SourceError(f"cannot read a source instance: {exc}") from exc
    series = {ds.SeriesInstanceUID for ds in datasets}
    if len(series) != 1:
        raise SourceError(f"source instances span {len(series)} series")
    return sort_by_position(datasets)


def sort_by_position(datasets: list[Dataset]) -> list[Dataset]:
    """Order slices along the normal of the (shared) image plane, as the volume loader does."""
    if not all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        return sorted(datasets, key=lambda ds: int(getattr(ds, "InstanceNumber", 0) or 0))
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))


def slice_volumes_ml(datasets: list[Dataset]) -> np.ndarray:
    """Volume (mL) of one voxel on each slice: pixel area x local slice spacing.

    Spacing is measured between neighbouring positions along the stack (half the distance to each
    neighbour), so uneven spacing and gantry tilt give the right volumes; the component along the
    image normal is what counts for a sheared (tilted) stack.
    """
    n = len(datasets)
    ps = [float(v) for v in datasets[0].PixelSpacing]
    area = ps[0] * ps[1]
    if n == 1 or "ImagePositionPatient" not in datasets[0]:
        thick = float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
        return np.full(n, area * thick / 1000.0)
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, float)) for ds in datasets])
    gaps = np.abs(np.diff(pos))
    spacing = np.empty(n)
    spacing[0], spacing[-1] = gaps[0], gaps[-1]
    spacing[1:-1] = (gaps[:-1] + gaps[1:]) / 2
    return area * spacing / 1000.0


def hu_slice(ds: Dataset) -> np.ndarray:
    """Pixels of one slice in HU (rescale applied)."""
    from pydicom.pixels import apply_modality_lut

    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
