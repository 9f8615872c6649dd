"""Clinical measurements from masks: volumes, ABC/2, midline shift, slice of maximal area.

Volumes are voxel counts x voxel volume on the ORIGINAL grid (the one SEG references).
ABC/2 and midline shift are read in the canonical orientation at native in-plane resolution
(axis permutations only, see :class:`models.preprocess.transforms.ModelFrame`), where rows run
anterior->posterior and columns run patient right->left.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BONE_HU = 300.0


def volume_ml(mask: np.ndarray, voxel_ml: float) -> float:
    return float(np.count_nonzero(mask)) * voxel_ml


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop specks (noise-level false positives) smaller than ``min_voxels``."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def max_area_slice(mask: np.ndarray) -> int | None:
    """k index (original order) of the slice with the largest hematoma area, None if empty."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.max() > 0 else None


def abc2_ml(mask_canon: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
    """ABC/2 of the largest hematoma (the bedside estimate, for comparison with the voxel count).

    A = longest in-plane diameter on the slice of largest area, B = longest diameter
    perpendicular to A on that slice, C = number of slices with hematoma x slice spacing.
    """
    if not mask_canon.any():
        return None
    comp = largest_component(mask_canon)
    areas = comp.reshape(comp.shape[0], -1).sum(axis=1)
    k = int(np.argmax(areas))
    rows, cols = np.nonzero(comp[k])
    pts = np.stack([rows * spacing[1], cols * spacing[2]], axis=1)
    if len(pts) < 2:
        a = b = min(spacing[1], spacing[2])
    else:
        centred = pts - pts.mean(axis=0)
        # Principal axis as the direction of A: extents along it and across it (+1 pixel).
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        along, across = centred @ vt[0], centred @ vt[1]
        pixel = float(np.mean(spacing[1:]))
        a = float(along.max() - along.min()) + pixel
        b = float(across.max() - across.min()) + pixel
    c = float(np.count_nonzero(areas)) * spacing[0]
    return a * b * c / 2.0 / 1000.0


def ideal_midline(hu_slice: np.ndarray) -> tuple[float, float] | None:
    """Skull symmetry line of one canonical slice: column = slope * row + intercept (pixels).

    Per row, the midpoint between the inner tables (first and last intracranial pixel) lies on
    the midsagittal line; a robust straight-line fit across rows follows a turned head.
    """
    bone = hu_slice > BONE_HU
    if bone.sum() < 50:
        return None
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(bone, iterations=2))
    cavity = filled & ~bone
    cavity = ndimage.binary_opening(cavity, iterations=1)
    if cavity.sum() < 200:
        return None
    cavity = largest_component(cavity)
    rows = np.nonzero(cavity.any(axis=1))[0]
    if len(rows) < 10:
        return None
    # Leave out the top and bottom 15 % of rows, where the skull curves and the fit is noisy.
    lo, hi = np.percentile(rows, [15, 85])
    rows = rows[(rows >= lo) & (rows <= hi)]
    mids = np.array([np.nonzero(cavity[r])[0][[0, -1]].mean() for r in rows])
    slope, intercept = np.polyfit(rows, mids, 1)
    residual = np.abs(mids - (slope * rows + intercept))
    inliers = residual <= max(2.0, 2.5 * np.median(residual))
    if inliers.sum() >= 5:
        slope, intercept = np.polyfit(rows[inliers], mids[inliers], 1)
    return float(slope), float(intercept)


def midline_shift_mm(hu_canon: np.ndarray, vent_left: np.ndarray, vent_right: np.ndarray,
                     spacing: tuple[float, float, float]) -> float | None:
    """Septum pellucidum displacement from the ideal midline (mm), at the level of largest ventricles.

    The septum lies between the lateral ventricles: per row where both are present, halfway
    between the right ventricle's medial edge and the left ventricle's medial edge (canonical
    columns run right->left). Distance is taken perpendicular to the (possibly oblique) midline.
    """
    both = vent_left.reshape(len(vent_left), -1).any(1) & vent_right.reshape(len(vent_right), -1).any(1)
    if not both.any():
        return None
    area = (vent_left.sum(axis=(1, 2)) + vent_right.sum(axis=(1, 2))) * both
    # Measure on the few slices with the largest ventricles (around the foramen of Monro).
    candidates = [int(k) for k in np.argsort(area)[::-1][:3] if area[k] > 0]
    shifts = []
    for k in candidates:
        line = ideal_midline(hu_canon[k])
        if line is None:
            continue
        slope, intercept = line
        offsets = []
        for r in np.nonzero(vent_left[k].any(1) & vent_right[k].any(1))[0]:
            right_medial = np.nonzero(vent_right[k, r])[0].max()
            left_medial = np.nonzero(vent_left[k, r])[0].min()
            septum = (right_medial + left_medial) / 2.0
            offsets.append(septum - (slope * r + intercept))
        if len(offsets) >= 2:
            # Perpendicular distance in mm: column offset x cos(angle of the line).
            shifts.append(float(np.median(offsets)) * spacing[2] / np.sqrt(1 + slope ** 2))
    if not shifts:
        return None
    return float(abs(np.median(shifts)))
