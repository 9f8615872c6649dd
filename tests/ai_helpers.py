"""Test helpers of the AI area: an analytic head in patient space and a DICOM CT series writer.

The analytic head is a function of LPS coordinates, so the same anatomy can be sampled on any
grid (tilted, rotated, shuffled) and a reader's affine can be checked against the truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Anatomy in LPS mm around the origin: x = left, y = posterior, z = superior.
SKULL_RADII = np.array([70.0, 90.0, 75.0])  # outer table
SKULL_THICKNESS = 6.0
BLEED_CENTRE = np.array([30.0, -35.0, 10.0])  # left, anterior: breaks every symmetry
BLEED_RADIUS = 12.0


def analytic_head(points: np.ndarray) -> np.ndarray:
    """HU at LPS points (N, 3): air, skull, brain, a left frontal bleed, midline ventricles."""
    r = np.linalg.norm(points / SKULL_RADII, axis=1)
    inner = np.linalg.norm(points / (SKULL_RADII - SKULL_THICKNESS), axis=1)
    hu = np.full(len(points), -1000.0)
    hu[r <= 1.0] = 1200.0
    hu[inner <= 1.0] = 32.0
    vent = np.linalg.norm((points - [0.0, -5.0, 15.0]) / [6.0, 25.0, 10.0], axis=1) <= 1.0
    hu[vent] = 6.0
    bleed = np.linalg.norm(points - BLEED_CENTRE, axis=1) <= BLEED_RADIUS
    hu[bleed] = 70.0
    return hu


def make_affine(row_dir, col_dir, pixel_spacing=(1.0, 1.0), step=(0.0, 0.0, 5.0),
                origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(i, j, k) -> LPS affine from DICOM-style parts (pixel_spacing = (row, column) spacing)."""
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(row_dir, float) * pixel_spacing[1]
    affine[:3, 1] = np.asarray(col_dir, float) * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return affine


def centred_affine(shape: tuple[int, int, int], row_dir, col_dir, pixel_spacing, step) -> np.ndarray:
    """An affine whose voxel centre (k, j, i) = shape/2 lands at the LPS origin."""
    affine = make_affine(row_dir, col_dir, pixel_spacing, step)
    centre_ijk = np.array([shape[2], shape[1], shape[0]], float) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_ijk
    return affine


def sample(shape: tuple[int, int, int], affine: np.ndarray, fn=analytic_head) -> np.ndarray:
    """Evaluate ``fn`` on every voxel of a (k, j, i) grid with this affine."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    lps = (affine @ ijk1)[:3].T
    return fn(lps).reshape(shape).astype(np.float32)


def write_ct_series(folder: Path, hu: np.ndarray, affine: np.ndarray, *, quirk12: bool = False,
                    shuffle: bool = False, seed: int = 0, tilt_header: float | None = None,
                    kernel: str = "H31s") -> list[Path]:
    """Write one single-frame CT Image Storage file per slice; returns the file paths.

    ``quirk12`` writes the archive quirk: BitsStored 12, PixelRepresentation 0, intercept 0,
    pixels = HU mod 4096 (12-bit two's complement). Otherwise pixels are HU + 1024 unsigned
    12-bit with intercept -1024 (the common, correct encoding). ``shuffle`` randomises the
    Instance Numbers and the file order so sorting must use positions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = hu.shape[0]
    row_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    spacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    numbers = rng.permutation(n) + 1 if shuffle else np.arange(n) + 1
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = "CT"
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "TEST0001"
        ds.Manufacturer = "ACME"
        ds.ConvolutionKernel = kernel
        ds.KVP = 120
        ds.SliceThickness = float(abs(affine[:3, 2] @ np.cross(row_dir, col_dir)))
        if tilt_header is not None:
            ds.GantryDetectorTilt = tilt_header
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(numbers[k])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in affine[:3, 3] + k * affine[:3, 2]]
        ds.PixelSpacing = [f"{v:.4f}" for v in spacing]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 1
        if quirk12:
            ds.RescaleIntercept = 0
            raw = np.mod(np.clip(np.rint(hu[k]), -1000, 3095).astype(np.int32), 4096)
        else:
            ds.RescaleIntercept = -1024
            raw = np.clip(np.rint(hu[k]) + 1024, 0, 4095).astype(np.int32)
        ds.PixelData = raw.astype(np.uint16).tobytes()
        paths.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [paths[i] for i in order]


# ----- small labelled heads for model plumbing tests (independent of models.phantom) ----------
def labelled_head(seed: int, bleed: bool, shape=(16, 64, 64), pixel_mm: float = 3.0,
                  step_mm: float = 8.0, septum_mm: float = 0.0, yaw_deg: float = 0.0):
    """A Volume plus masks (hematoma, ventricles) and per-subtype masks on its own grid.

    The bleed (an intraparenchymal blob) moves with ``seed``; ``septum_mm`` pushes both
    ventricles towards patient left (a midline shift of that size).
    """
    from models.volume import Volume

    rng = np.random.default_rng(seed)
    yaw = np.radians(yaw_deg)  # the head turned in the scanner: image axes oblique to it
    row_dir, col_dir = [np.cos(yaw), np.sin(yaw), 0], [-np.sin(yaw), np.cos(yaw), 0]
    affine = centred_affine(shape, row_dir, col_dir, (pixel_mm, pixel_mm), (0, 0, step_mm))
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    lps = (affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3].T
    hu = analytic_head(lps)
    hu[hu == 70.0] = 32.0  # the analytic bleed is drawn below instead
    vent = np.linalg.norm((lps - [septum_mm, -5.0, 15.0]) / [14.0, 25.0, 12.0], axis=1) <= 1.0
    hu[vent] = 6.0
    vent_left = vent & (lps[:, 0] > septum_mm + 1.5)
    vent_right = vent & (lps[:, 0] < septum_mm - 1.5)
    hu[vent & ~vent_left & ~vent_right] = 30.0  # the septum pellucidum itself
    hematoma = np.zeros(len(lps), bool)
    if bleed:
        centre = np.array([rng.uniform(-35, 35), rng.uniform(-45, 35), rng.uniform(-10, 30)])
        radius = rng.uniform(9, 16)
        hematoma = (np.linalg.norm(lps - centre, axis=1) <= radius) & (hu > 0) & (hu < 100)
        hu[hematoma] = rng.uniform(60, 80)
    hu = hu + rng.normal(0, 3, len(hu))
    reshape = (lambda a: a.reshape(shape))
    volume = Volume(hu=reshape(hu).astype(np.float32), affine=affine)
    masks = {"hematoma": reshape(hematoma), "ventricle_left": reshape(vent_left),
             "ventricle_right": reshape(vent_right & ~hematoma)}
    return volume, masks, {"intraparenchymal": reshape(hematoma)}


def labelled_cases(n: int, start_seed: int = 0, frame_args=None):
    """Model-grid cases from :func:`labelled_head`, alternating normal and bleeding studies."""
    from models.ich.data import case_from_volume

    frame_args = frame_args or {"spacing_mm": 4.0, "size": 64}
    cases = []
    for s in range(start_seed, start_seed + n):
        volume, masks, subtype_masks = labelled_head(s, bleed=bool(s % 2))
        cases.append(case_from_volume(f"head-{s}", volume, frame_args, masks=masks,
                                      subtype_masks=subtype_masks))
    return cases
