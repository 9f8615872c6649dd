"""The cranial cavity of a head CT: what the models look at and what defacing never changes.

Both the defacer (:mod:`workers.deid.deface`) and the models' preprocessing need the same region:
the soft content enclosed by the skull. The defacer protects it (plus margins) and writes
outside it, inside only dense bone as one value; the models see only it (everything else is
set to air) and dense bone as that value. So by construction the models' input is the same
before and after defacing, and a scalp haematoma, a headrest or the face can never drive a
finding.

How the cavity is found (on a grid block-reduced in plane to ~0.8 mm, slices kept):
bone is closed and filled in axial, coronal and sagittal planes (a fossa floor cut obliquely is
open in one orientation, closed in another), soft content only, largest 3D component after an
opening that cuts nerves and muscles linking it to the orbits, minus slice components ringed
by orbital fat (a globe joined through a thick slice's orbital roof); the foramen magnum
region is added from the per-slice hull of the deep, posterior part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.volume import Volume

AIR_HU = -1000
# Dense bone (never cavity content: CavityParams.content_hu's upper bound) is shown to the
# models as one value. Its texture says nothing about bleeding, and the defacer may then
# destroy the values of facial bone in the models' ring without changing what they see.
DENSE_BONE_HU = 1000.0
MODEL_BONE_HU = 1600
SUPERIOR = np.array([0.0, 0.0, 1.0])  # LPS +z


class CavityNotFound(ValueError):
    """No cranial cavity in the volume (not a head, or the skull is not in the field of view)."""


@dataclass
class CavityParams:
    bone_hu: float = 200.0  # partial-volume bone still counts as wall
    # What fills a cranial cavity. The upper bound sits near the midpoint between brain and
    # cortical bone, so partial-volume voxels at the inner table (also across a slice lying
    # on a fossa floor) count as cavity, as a "brain fraction >= 0.5" mask would.
    content_hu: tuple[float, float] = (-50.0, DENSE_BONE_HU)  # fat (orbits, scalp) is not content
    coarse_mm: float = 0.8  # in-plane working resolution for the 3D morphology
    margin_mm: float = 1.5  # the defacer's protected shell around the cavity (+ coarse-grid slack)
    close_mm: float = 15.0  # seals sutures, ear canals, fissures before the ring is filled
    close_small_mm: float = 4.0  # ... and a small one keeps small rings (atlas, vertex)
    close_mid_mm: float = 8.0  # coronal and sagittal planes
    open_mm: float = 5.0  # 3D opening radius: cuts nerves/muscles linking orbit and cavity
    min_cavity_ml: float = 150.0  # less: no skull/head in the volume
    # A globe enclosed by the axial closing can join the cavity through an orbital roof that a
    # thick slice mixes with the brain above it. In its own slice it is a separate component
    # ringed by orbital fat; brain is walled by bone and CSF, never ringed by fat.
    orbit_fat_share: float = 0.25  # ring more than this share fat: an orbit, not cavity
    orbit_ring_mm: float = 2.0
    skull_base_mm: float = -30.0  # slices this far below the centre get the foramen fill
    skull_base_front_mm: float = 10.0  # ... up to this far in front of the centre


@dataclass
class Cavity:
    grid: "CoarseGrid"
    raw: np.ndarray  # bool, coarse grid: the enclosed component
    mask: np.ndarray  # bool, coarse grid: raw + foramen magnum fill
    centre: np.ndarray  # LPS mm, centroid of the cavity's main body
    ml: float


def find_cavity(volume: Volume, params: CavityParams | None = None) -> Cavity:
    """The cranial cavity of ``volume``; raises :class:`CavityNotFound` if there is none."""
    p = params or CavityParams()
    grid = CoarseGrid(volume, p.coarse_mm)
    raw = cranial_cavity(grid, p)
    ml = float(raw.sum()) * grid.voxel_ml
    if ml < p.min_cavity_ml:
        raise CavityNotFound(f"no cranial cavity found ({ml:.0f} mL): not a head CT?")
    centre = grid.coordinates(main_body(raw)).mean(axis=0)
    mask = raw | skull_base_fill(grid, raw, centre, p)
    return Cavity(grid, raw, mask, centre, ml)


def intracranial_mask(volume: Volume, params: CavityParams | None = None,
                      cavity: Cavity | None = None) -> np.ndarray:
    """bool (k, j, i) on the volume's grid: the cavity and the voxel ring around it in plane.

    The ring (8-neighbours on the coarse grid, about 1 mm) holds the partial-volume voxels at
    the inner table, where a thin subdural collection lies at coarse pixels. In-plane only: no
    whole neighbouring slice is added. Always a subset of what the defacer protects (the
    cavity's 26-neighbour shell and more); inside it the defacer writes only dense bone, as the
    value the models see it as (``keep_intracranial``), so it never changes what they see.
    """
    found = cavity or find_cavity(volume, params or CavityParams())
    return found.grid.upsample(with_ring(found.mask))


def with_ring(mask: np.ndarray) -> np.ndarray:
    """A coarse-grid mask grown by its in-plane 8-neighbour ring (the models' input region)."""
    ring = np.zeros((3, 3, 3), dtype=bool)
    ring[1] = True
    return ndimage.binary_dilation(mask, structure=ring)


def keep_intracranial(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HU with everything outside ``mask`` set to air and dense bone flattened: what the
    models are given."""
    if mask.shape != hu.shape:
        raise ValueError(f"intracranial mask {mask.shape} does not match the volume {hu.shape}")
    return np.where(mask, flatten_dense_bone(hu), np.asarray(AIR_HU, dtype=hu.dtype))


def flatten_dense_bone(hu: np.ndarray) -> np.ndarray:
    """HU with every voxel of at least ``DENSE_BONE_HU`` set to ``MODEL_BONE_HU``."""
    return np.where(hu >= DENSE_BONE_HU, np.asarray(MODEL_BONE_HU, dtype=hu.dtype), hu)


def save_mask(path, mask: np.ndarray) -> None:  # noqa: ANN001
    """Write a boolean mask (bit-packed: a 512x512x40 mask is a few kB)."""
    np.savez_compressed(path, bits=np.packbits(mask.astype(bool).ravel()),
                        shape=np.asarray(mask.shape, np.int64))


def load_mask(path) -> np.ndarray:  # noqa: ANN001
    with np.load(path) as data:
        shape = tuple(int(v) for v in data["shape"])
        return np.unpackbits(data["bits"], count=int(np.prod(shape))).astype(bool).reshape(shape)


class CoarseGrid:
    """The volume block-reduced in plane to ~``coarse_mm`` (slices kept) for fast morphology."""

    def __init__(self, volume: Volume, coarse_mm: float) -> None:
        from skimage.measure import block_reduce

        dk, dj, di = volume.spacing
        self.fj, self.fi = block_factor(dj, coarse_mm), block_factor(di, coarse_mm)
        self.shape = volume.hu.shape
        hu = volume.hu.astype(np.float32, copy=False)
        self.hu = block_reduce(hu, (1, self.fj, self.fi), np.mean, cval=AIR_HU)
        # Bone by block maximum: a thin wall inside a block still closes the ring.
        self.hu_max = block_reduce(hu, (1, self.fj, self.fi), np.max, cval=AIR_HU)
        self.coarse_spacing = np.array([dk, dj * self.fj, di * self.fi])
        self.voxel_ml = float(np.prod(self.coarse_spacing)) / 1000.0
        # Farthest a full-resolution voxel centre lies from its coarse voxel's centre.
        self.slack_mm = 0.5 * float(np.hypot((self.fj - 1) * dj, (self.fi - 1) * di))
        affine = volume.affine.copy()
        # Coarse voxel centre (i', j') sits at fine index (i' * f + (f - 1) / 2).
        scale = np.diag([self.fi, self.fj, 1.0, 1.0])
        shift = np.eye(4)
        shift[:3, 3] = [(self.fi - 1) / 2, (self.fj - 1) / 2, 0]
        self.affine = affine @ shift @ scale

    def upsample(self, mask: np.ndarray) -> np.ndarray:
        """A coarse (k, j', i') mask on the volume's grid (k, j, i)."""
        up = np.repeat(np.repeat(mask, self.fj, axis=1), self.fi, axis=2)
        return up[:, : self.shape[1], : self.shape[2]]

    def coordinates(self, mask: np.ndarray) -> np.ndarray:
        """LPS mm of the coarse voxels in ``mask`` (n, 3)."""
        k, j, i = np.nonzero(mask)
        ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(np.float64)
        return (self.affine @ ijk1)[:3].T

    def z_of_voxels(self) -> np.ndarray:
        """LPS z (mm) of every coarse voxel."""
        k, j, i = np.indices(self.hu.shape, dtype=np.float32)
        a = self.affine
        return (a[2, 0] * i + a[2, 1] * j + a[2, 2] * k + a[2, 3]).astype(np.float32)


def block_factor(pixel_mm: float, coarse_mm: float) -> int:
    """Pixels per block whose size is nearest ``coarse_mm`` by ratio, not by difference: 0.55 mm
    pixels (a 28 cm field at 512) get 2 (1.1 mm is nearer 0.8 mm than 0.55 mm is), so the
    morphology runs on a quarter of the pixels instead of all of them."""
    ratio = coarse_mm / float(pixel_mm)
    f = max(1, int(np.floor(ratio)))
    return f + 1 if ratio > np.sqrt(f * (f + 1)) else f


def close_disk(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing with a disk of ``radius_mm`` via distance transforms (fast for
    large radii). The border is padded so that walls touching the image edge stay walls."""
    if not mask.any():
        return mask
    pad = int(np.ceil(radius_mm / float(min(spacing)))) + 1
    m = np.pad(mask, pad)
    grown = ndimage.distance_transform_edt(~m, sampling=spacing) <= radius_mm
    closed = ~(ndimage.distance_transform_edt(grown, sampling=spacing) <= radius_mm) | m
    return closed[pad:-pad, pad:-pad]


def cranial_cavity(grid: CoarseGrid, p: CavityParams) -> np.ndarray:
    """Soft tissue enclosed by the skull, as one 3D component (coarse grid)."""
    bone = grid.hu_max > p.bone_hu
    lo, hi = p.content_hu
    content = (grid.hu > lo) & (grid.hu < hi)
    # A slice only shows a closed ring where the cavity wall crosses it steeply: fossa floors
    # cut obliquely (posterior fossa, middle fossa) are open in axial slices but closed in
    # coronal or sagittal ones. "Enclosed in any of the three orientations" covers all walls.
    inside = np.zeros(bone.shape, dtype=bool)
    spacing = grid.coarse_spacing
    # A large closing seals wide gaps (fissures, ear canals) but also fills small cavities
    # whole (the spinal canal in the atlas ring, the vertex): axial slices use both radii.
    radii = {0: (p.close_small_mm, p.close_mm), 1: (p.close_mid_mm,), 2: (p.close_mid_mm,)}
    for axis in range(3):
        plane_spacing = np.delete(spacing, axis)
        for idx in range(bone.shape[axis]):
            where = [slice(None)] * 3
            where[axis] = idx
            plane = bone[tuple(where)]
            if not plane.any():
                continue
            if axis == 0:  # a skull leaving the image: the cut is sealed, never cavity (lid)
                plane = plane | frame_seal(plane, content[tuple(where)])
            for radius in radii[axis]:
                wall = close_disk(plane, radius, plane_spacing)
                lid = wall & ~plane  # soft tissue in a sealed gap: never cavity (no leak)
                inside[tuple(where)] |= ndimage.binary_fill_holes(wall) & ~lid
    inside &= content
    # A 3D opening cuts thin bridges out of the cavity: optic nerves and eye muscles running
    # through the orbit apex, partial-volume leaks through thin bone. The largest remaining
    # part is the cavity; it regrows by the same radius within ``inside``.
    core = ndimage.distance_transform_edt(inside, sampling=spacing) > p.open_mm
    if not core.any():
        return core
    core = largest_component(core)
    cavity = (ndimage.distance_transform_edt(~core, sampling=spacing) <= p.open_mm + 0.01) & inside
    # Close internal holes (calcifications, bone-dense blood) slice by slice and in 3D.
    cavity = np.stack([ndimage.binary_fill_holes(s) for s in cavity])
    cavity = ndimage.binary_fill_holes(cavity)
    return cavity & ~orbit_parts(grid, cavity, p)


def orbit_parts(grid: CoarseGrid, cavity: np.ndarray, p: CavityParams) -> np.ndarray:
    """Per axial slice, the cavity's components other than the largest whose surrounding ring
    (``orbit_ring_mm``) is more than ``orbit_fat_share`` fat (-200..-50 HU): orbits."""
    fat = (grid.hu > -200.0) & (grid.hu <= p.content_hu[0])
    steps = max(1, int(round(p.orbit_ring_mm / float(min(grid.coarse_spacing[1:])))))
    eight = np.ones((3, 3), dtype=bool)
    orbits = np.zeros_like(cavity)
    for k in range(cavity.shape[0]):
        labels, n = ndimage.label(cavity[k], structure=eight)
        if n < 2:
            continue
        sizes = ndimage.sum_labels(cavity[k], labels, np.arange(1, n + 1))
        for c in np.flatnonzero(sizes < sizes.max()) + 1:
            part = labels == c
            ring = ndimage.binary_dilation(part, structure=eight, iterations=steps) & ~cavity[k]
            if ring.any() and fat[k][ring].mean() > p.orbit_fat_share:
                orbits[k] |= part
    return orbits


def frame_seal(bone: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Image-frame pixels (2D) that close a cranial cavity cut by the field of view.

    Where the skull leaves the image, brain touches the frame between two bone contacts and the
    cavity is open to the outside. A run of content pixels along the frame that touches bone
    and no air or fat is such a cut (the scalp's runs end in air, the nose's have no bone).
    Only the image frame: a circular scan field read as air stays open (not sealed).
    """
    frame = np.zeros_like(bone)
    frame[0] = frame[-1] = True
    frame[:, 0] = frame[:, -1] = True
    cut = frame & content & ~bone
    if not cut.any():
        return cut
    eight = np.ones((3, 3), dtype=bool)
    runs, n = ndimage.label(cut, structure=eight)
    index = np.arange(1, n + 1)
    touches_bone = ndimage.maximum(ndimage.binary_dilation(frame & bone, eight), runs, index)
    outside = frame & ~content & ~bone  # air or fat on the frame
    touches_outside = ndimage.maximum(ndimage.binary_dilation(outside, eight), runs, index)
    sealed = index[(np.asarray(touches_bone) > 0) & (np.asarray(touches_outside) == 0)]
    return np.isin(runs, sealed)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def main_body(cavity: np.ndarray) -> np.ndarray:
    """The cavity without thin tails (spinal canal): slices with >= 25 % of the largest area."""
    areas = cavity.sum(axis=(1, 2))
    keep = areas >= 0.25 * areas.max()
    return cavity & keep[:, None, None]


def posterior_dir(grid: CoarseGrid, cavity: np.ndarray, centre: np.ndarray) -> np.ndarray | None:
    """Unit vector (axial plane) from the cavity centre towards its deepest part, if any."""
    pts = grid.coordinates(cavity) - centre
    v = pts @ SUPERIOR
    if v.size == 0 or v.min() > -40.0:
        return None
    post = np.median(pts[v < v.min() + 25.0][:, :2], axis=0)
    norm = float(np.linalg.norm(post))
    if norm < 1e-6:
        return None
    return np.array([post[0] / norm, post[1] / norm, 0.0])


def skull_base_fill(grid: CoarseGrid, cavity: np.ndarray, centre: np.ndarray,
                    p: CavityParams) -> np.ndarray:
    """Content inside the per-slice convex hull of the cavity, low and behind the centre.

    Around the foramen magnum the wall has a hole in every orientation (the canal leaves
    through it), so the medulla and cisterna magna are not "enclosed". They lie between the
    cerebellar halves and the canal: inside the hull of the cavity in their slice. Restricted
    to the deep, posterior part so that the orbits (anterior) are never added.
    """
    from skimage.morphology import convex_hull_image

    post_dir = posterior_dir(grid, cavity, centre)
    if post_dir is None:
        return np.zeros_like(cavity)
    lo, hi = p.content_hu
    z = grid.z_of_voxels()
    add = np.zeros_like(cavity)
    for k in range(cavity.shape[0]):
        if cavity[k].sum() < 3:
            continue
        zk = z[k] - centre[2]
        if zk.mean() > p.skull_base_mm:
            continue
        hull = convex_hull_image(cavity[k])
        j, i = np.nonzero(hull)
        xyz = (grid.affine @ np.vstack([i, j, np.full_like(i, k), np.ones_like(i)]))[:3].T
        behind = (xyz - centre) @ post_dir > -p.skull_base_front_mm
        content = (grid.hu[k, j, i] > lo) & (grid.hu[k, j, i] < hi)
        add[k, j[behind & content], i[behind & content]] = True
    return add
