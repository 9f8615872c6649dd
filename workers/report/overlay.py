"""Secondary Capture overlay series: colour contours on brain-window slices + a summary slice.

For viewers that do not render SEG (most PACS viewers in the field). Image 1 is the summary
(findings text, burned in; no patient identity is written on it), then one image per slice
that has hematoma (or, with no hematoma, the slice with the largest ventricle area), in slice
order. The text and the contours use the same colours as the SEG segments.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from skimage.segmentation import find_boundaries

from workers.report import codes
from workers.report.seg import MANUFACTURER, Segment
from workers.report.sources import hu_slice

OVERLAY_SERIES_NUMBER = 9903
BRAIN_WINDOW = (40.0, 80.0)  # level, width
MAX_SLICES = 60  # keeps the series small for very thin reconstructions


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def contour_rgb(gray: np.ndarray, segments: list[Segment], k: int) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for s in segments:
        m = s.mask[k]
        if m.any():
            rgb[find_boundaries(m, mode="inner")] = codes.COLOURS.get(s.key, (255, 0, 0))
    return rgb


def summary_image(lines: list[str], shape: tuple[int, int], colour_keys: list[tuple[str, str]]) -> np.ndarray:
    """Black image with the findings text (scaled to the image size) and a colour legend."""
    rows, cols = max(shape[0], 256), max(shape[1], 256)
    img = Image.new("RGB", (cols, rows), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    size = max(10, rows // 28)
    while True:  # shrink the font until text and legend fit the image
        try:
            font = ImageFont.load_default(size=size)  # scalable default font: Pillow >= 10.1
        except TypeError:
            font = ImageFont.load_default()
        wrapped = _wrap(lines, draw, font, cols - 2 * size)
        if size <= 10 or (len(wrapped) + len(colour_keys) + 2) * size * 1.4 <= rows:
            break
        size -= 1
    y = size
    for line in wrapped:
        draw.text((size, y), line, fill=(255, 255, 255), font=font)
        y += int(size * 1.4)
    y += size // 2
    for key, label in colour_keys:
        draw.rectangle([size, y, size * 2, y + size], fill=codes.COLOURS.get(key, (255, 0, 0)))
        draw.text((size * 3, y), label, fill=(255, 255, 255), font=font)
        y += int(size * 1.4)
    return np.asarray(img)


def _wrap(lines: list[str], draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:  # noqa: ANN001
    """Break long lines (e.g. a failure reason) at spaces so they fit the image width."""
    out: list[str] = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and draw.textlength(trial, font=font) > width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    return out


def overlay_slices(segments: list[Segment], n_slices: int) -> list[int]:
    hem = [s for s in segments if s.is_hematoma]
    if hem:
        ks = sorted({int(k) for s in hem for k in np.flatnonzero(s.mask.any(axis=(1, 2)))})
    elif segments:
        area = sum(s.mask.sum(axis=(1, 2)) for s in segments)
        ks = [int(np.argmax(area))]
    else:
        ks = []
    if len(ks) > MAX_SLICES:
        ks = [ks[i] for i in np.linspace(0, len(ks) - 1, MAX_SLICES).round().astype(int)]
    return ks


def build_overlay(sources: list[Dataset], segments: list[Segment], summary_lines: list[str], *,
                  series_instance_uid: str, uid_seed: str) -> list[Dataset]:
    """SC images: summary first, then contour slices referencing their source CT instance."""
    ref = sources[0]
    legend = [(s.key, s.label) for s in segments]
    images = [(summary_image(summary_lines, (int(ref.Rows), int(ref.Columns)), legend), None)]
    for k in overlay_slices(segments, len(sources)):
        gray = window(hu_slice(sources[k]), *BRAIN_WINDOW)
        images.append((contour_rgb(gray, segments, k), sources[k]))
    out = []
    for n, (pixels, src) in enumerate(images, start=1):
        out.append(_sc_image(ref, pixels, src, n, series_instance_uid,
                             generate_uid(entropy_srcs=[uid_seed, "overlay", str(n)])))
    return out


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    iop = np.array(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)

    def letters(v: np.ndarray) -> str:
        # Dominant direction only (highdicom accepts single letters; tilted axes round to it).
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        axis = int(np.argmax(np.abs(v)))
        return names[axis][0] if v[axis] > 0 else names[axis][1]

    return letters(iop[:3]), letters(iop[3:])


def _sc_image(ref: Dataset, pixels: np.ndarray, src: Dataset | None, number: int,
              series_uid: str, sop_uid: str) -> Dataset:
    spacing = tuple(float(v) for v in ref.PixelSpacing) if src is not None and "PixelSpacing" in ref else None
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=ref.StudyInstanceUID,
        series_instance_uid=series_uid, series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=number, manufacturer=MANUFACTURER,
        patient_id=getattr(ref, "PatientID", None), patient_name=getattr(ref, "PatientName", None),
        patient_birth_date=getattr(ref, "PatientBirthDate", None) or None,
        patient_sex=getattr(ref, "PatientSex", None) or None,
        accession_number=getattr(ref, "AccessionNumber", None), study_id=getattr(ref, "StudyID", None),
        study_date=getattr(ref, "StudyDate", None) or None, study_time=getattr(ref, "StudyTime", None) or None,
        referring_physician_name=getattr(ref, "ReferringPhysicianName", None),
        pixel_spacing=spacing, patient_orientation=_patient_orientation(ref),
    )
    sc.SeriesDescription = "ichnode overlay (AI, not verified)"
    sc.BurnedInAnnotation = "YES" if src is None else "NO"
    sc.Laterality = ""  # Type 2C in General Series for SC; a head is not a paired body part
    if getattr(ref, "StudyDescription", None):
        sc.StudyDescription = ref.StudyDescription
    if src is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [item]
    return sc
