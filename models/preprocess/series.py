"""Read a DICOM CT series into a :class:`models.volume.Volume` on its ORIGINAL voxel grid.

Why no resampling here: masks predicted later must map one-to-one onto the source instances so
that DICOM SEG can reference them. Gantry tilt therefore stays in the affine (the slice step
vector is not parallel to the slice normal) and a head stored rotated 90° stays rotated in the
array; :mod:`models.preprocess.transforms` builds the model's canonical view and maps back.

Rules (each failure is a :class:`SeriesError` with one clear sentence):

* only axial image instances count: localizers and instances without pixels are skipped;
* every slice needs Image Orientation/Position (Patient) and Pixel Spacing, all slices one
  orientation and one matrix;
* slices are sorted by position along the slice normal, never by Instance Number;
* the slice step must be constant (a gap or a duplicate position is an error);
* rescale slope/intercept are applied, including the 12-bit archive quirk (see
  :func:`_fix_12bit_quirk`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.volume import Volume

log = logging.getLogger(__name__)

MIN_SLICES = 5
ORIENTATION_TOL = 1e-3  # direction cosines that differ by more are another orientation
SPACING_TOL = 0.1  # relative deviation of one slice step from the median step
CT_IMAGE_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}


class SeriesError(ValueError):
    """A series that cannot be turned into a volume (the message says why, without PHI)."""


@dataclass
class _Slice:
    ds: Dataset
    position: np.ndarray  # IPP, mm
    along_normal: float


def load_series(paths: list[Path] | list[str], *, min_slices: int = MIN_SLICES) -> Volume:
    """Read the instances in ``paths`` (one series) into a Volume in HU, sorted along the normal."""
    datasets = [_read(Path(p)) for p in paths]
    datasets = [ds for ds in datasets if ds is not None and _is_axial_image(ds)]
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise SeriesError("instances from more than one series were given")
    if len(datasets) < min_slices:
        raise SeriesError(f"too few image slices: {len(datasets)} (need at least {min_slices})")

    row_dir, col_dir = _common_orientation(datasets)
    normal = np.cross(row_dir, col_dir)
    slices = sorted(
        (_Slice(ds, pos, float(pos @ normal)) for ds, pos in ((d, _position(d)) for d in datasets)),
        key=lambda s: s.along_normal,
    )
    step = _slice_step(slices)
    rows, cols = _common_matrix(datasets)
    row_spacing, col_spacing = _common_pixel_spacing(datasets)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # i (column index) moves along the row direction
    affine[:3, 1] = col_dir * row_spacing  # j (row index) moves along the column direction
    affine[:3, 2] = step  # k: the actual step between slice origins (keeps gantry tilt)
    affine[:3, 3] = slices[0].position

    hu, quirk_fixed = _pixels_in_hu([s.ds for s in slices], rows, cols)
    meta = _technical_meta(slices[0].ds, step, normal, len(slices), quirk_fixed)
    return Volume(hu=hu, affine=affine,
                  sop_instance_uids=[str(s.ds.SOPInstanceUID) for s in slices], meta=meta)


def _read(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise SeriesError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from exc


def _is_axial_image(ds: Dataset) -> bool:
    """Skip what is not a cross-sectional slice: localizers/scouts and non-image objects."""
    if "PixelData" not in ds:
        return False
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return False
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SeriesError("multi-frame (enhanced) CT is not supported; send single-frame slices")
    return True


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise SeriesError(f"missing geometry: {keyword} absent or malformed on a slice")
    try:
        return np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"missing geometry: {keyword} is not numeric") from exc


def _position(ds: Dataset) -> np.ndarray:
    return _floats(ds, "ImagePositionPatient", 3)


def _common_orientation(datasets: list[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    iops = np.array([_floats(ds, "ImageOrientationPatient", 6) for ds in datasets])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise SeriesError("mixed orientation: slices have different Image Orientation (Patient)")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(row_dir) - 1) > 0.01 or abs(np.linalg.norm(col_dir) - 1) > 0.01 \
            or abs(row_dir @ col_dir) > 0.01:
        raise SeriesError("missing geometry: Image Orientation (Patient) is not two unit vectors")
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def _slice_step(slices: list[_Slice]) -> np.ndarray:
    """The constant step vector between consecutive slice origins (tilt included)."""
    along = np.array([s.along_normal for s in slices])
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise SeriesError("duplicate slice positions (two slices at the same place)")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOL * median:
        raise SeriesError(
            f"inconsistent slice spacing: steps {gaps.min():.2f}..{gaps.max():.2f} mm "
            f"(missing slices or mixed reconstructions)")
    positions = np.array([s.position for s in slices])
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    # With tilt the in-plane offset grows linearly; anything else is a broken stack.
    residual = positions - (positions[0] + np.outer(np.arange(len(slices)), step))
    if np.abs(residual).max() > max(0.5, SPACING_TOL * median):
        raise SeriesError("inconsistent slice positions: slice origins do not lie on a line")
    return step


def _common_matrix(datasets: list[Dataset]) -> tuple[int, int]:
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise SeriesError(f"mixed matrix sizes in one series: {sorted(shapes)}")
    return shapes.pop()


def _common_pixel_spacing(datasets: list[Dataset]) -> tuple[float, float]:
    spacings = np.array([_floats(ds, "PixelSpacing", 2) for ds in datasets])
    if np.any(spacings <= 0):
        raise SeriesError("missing geometry: Pixel Spacing must be positive")
    if np.abs(spacings - spacings[0]).max() > 1e-3:
        raise SeriesError("mixed Pixel Spacing within one series")
    return float(spacings[0, 0]), float(spacings[0, 1])


def _pixels_in_hu(datasets: list[Dataset], rows: int, cols: int) -> tuple[np.ndarray, bool]:
    """Stack the slices in HU (int16 when the rescale keeps integers, else float32)."""
    hu = np.empty((len(datasets), rows, cols), dtype=np.float32)
    integral = True
    quirk_fixed = False
    for k, ds in enumerate(datasets):
        try:
            raw = ds.pixel_array  # pydicom picks the decoder (native, pylibjpeg, gdcm)
        except Exception as exc:  # noqa: BLE001 - decoder libraries raise many types
            raise SeriesError(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        raw = raw.astype(np.int32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        padding = ds.get("PixelPaddingValue")
        # Outside the scan circle: read as air instead of a value like -3024 or 0.
        padded = (raw == int(padding)) if padding is not None else None
        if _has_12bit_quirk(ds, raw, slope, intercept):
            raw, intercept = _fix_12bit_quirk(raw), -1000.0
            quirk_fixed = True
        values = raw * slope + intercept
        if padded is not None:
            values[padded] = -1000.0
        integral &= slope == int(slope) and intercept == int(intercept)
        hu[k] = values
    if quirk_fixed:
        log.info("12-bit signed-pixel quirk detected and corrected")
    if integral and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16), quirk_fixed
    return hu, quirk_fixed


def _has_12bit_quirk(ds: Dataset, raw: np.ndarray, slope: float, intercept: float) -> bool:
    """BitsStored 12, unsigned, intercept > -100, yet the pixels are 12-bit signed values.

    Seen in RSNA 2019 archives: air then reads near +3000 HU. The header triple alone is not
    proof (some scanners really store unsigned HU+1024 with intercept 0), so we also require
    the pixel signature: a large share of raw values in the wrapped-negative range 2048..4095
    where a real head has only bone, and almost none of it.
    """
    if int(ds.get("BitsStored", 16)) != 12 or int(ds.get("PixelRepresentation", 0)) != 0:
        return False
    if intercept <= -100 or slope != 1:
        return False
    if raw.size == 0 or raw.max() >= 4096:
        return False
    wrapped = float(np.mean(raw >= 2048))
    return wrapped > 0.05


def _fix_12bit_quirk(raw: np.ndarray) -> np.ndarray:
    """Undo the wrap: raw = HU mod 4096 with intercept 0 -> HU for HU in [-1000, 3095]."""
    fixed = raw + 1000
    fixed[fixed >= 4096] -= 4096
    return fixed


def _technical_meta(ds: Dataset, step: np.ndarray, normal: np.ndarray, n: int,
                    quirk_fixed: bool) -> dict:
    """Acquisition facts a model card or a reviewer needs; nothing that identifies anyone."""
    thickness = ds.get("SliceThickness")
    kernel = ds.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    step_len = float(np.linalg.norm(step))
    tilt_deg = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / step_len, -1, 1))))
    header_tilt = ds.get("GantryDetectorTilt")
    return {
        "modality": str(ds.get("Modality", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "model": str(ds.get("ManufacturerModelName", "")),
        "kernel": str(kernel) if kernel is not None else "",
        "kvp": float(ds.KVP) if ds.get("KVP") not in (None, "") else None,
        "slice_thickness_mm": float(thickness) if thickness not in (None, "") else None,
        "slice_step_mm": step_len,
        "spacing_along_normal_mm": float(abs(step @ normal)),
        "tilt_deg": round(tilt_deg, 3),
        "header_tilt_deg": float(header_tilt) if header_tilt not in (None, "") else None,
        "n_slices": n,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits_stored": int(ds.get("BitsStored", 16)),
        "quirk_12bit_fixed": quirk_fixed,
        "image_orientation": [round(float(v), 6) for v in ds.ImageOrientationPatient],
    }
