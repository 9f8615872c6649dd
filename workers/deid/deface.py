"""Defacing of a head CT :class:`~models.volume.Volume`: the MosMed method and ichnode's method.

``mosmed`` reproduces the MosMed ICH dataset algorithm (Kuzmina/Morozov et al.): per axial slice,
on the lowest 60 % of slices, threshold at 490 HU, fill the convex hull of the bone, cast 9 rays
from the hull's centroid towards the "front of the image" (the top rows: it assumes the face
points up), and paint an ellipse of random size filled with random values where each ray leaves
the hull. It knows nothing of orientation, so a turned head gets its side painted.

``ichnode`` (default) works in 3D and in patient space:

1. the cranial cavity is found from the skull (:mod:`models.preprocess.cavity`, the same
   function that masks the models' input); the spinal canal is added. The cavity, its voxel
   shell and margins form the protected set: never written, and checked, as is that the
   models' input is the same after defacing (so defacing cannot change a model result);
2. anterior is the cavity's long axis in the axial plane (a skull is longer front to back), its
   sign from the image (the deepest cavity part, posterior fossa and foramen magnum, lies
   behind the centre; the face protrudes farther beyond the skull than the occiput), checked
   against the patient axes of Image Orientation (Patient); weak or disagreeing cues mean both
   sides are treated as face (privacy first);
3. everything outside the protected set, below a level just above the orbits (in front of the
   cavity: above its orbital roofs, which rise with the face when the chin is down) and in
   front of a coronal plane behind the ears, is replaced by air: nose, lips, eyes and orbits,
   facial bone, ears' soft tissue. Air rather than noise: it leaves nothing to reconstruct (no
   silhouette, since the whole region including the air around the face is replaced) and no
   fake structure for the models to react to;
4. inside the face zone, the protected shell outside the models' input is decided voxel by
   voxel: bone (at least ``wall_from_hu``) and partial-volume bone that touches no brain-like
   voxel joined to the cavity become one constant bone value (orbital roofs, frontal bone:
   their values are destroyed, but the cavity keeps a closed wall, so it is found again on the
   defaced copy; air there let the cavity leak into the orbits); so does dense bone in the
   models' own ring, which they see as that same value; fat, air and brain-like values cut off
   from the cavity (orbital muscle, globe) become air; brain joined to the cavity, the
   partial-volume voxels touching it and those on a ramp rising from it (a head that moved
   smears the brain's edge over millimetres) keep their values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from models.preprocess.cavity import (AIR_HU, DENSE_BONE_HU, MODEL_BONE_HU, SUPERIOR,
                                     CavityNotFound, CavityParams, CoarseGrid, find_cavity,
                                     intracranial_mask, keep_intracranial, largest_component,
                                     main_body, posterior_dir)
from models.volume import Volume

__all__ = ["ANTERIOR", "SUPERIOR", "DefaceError", "DefaceResult", "IchnodeParams", "deface",
           "head_frame", "largest_component"]

Mode = Literal["ichnode", "mosmed"]
ANTERIOR = np.array([0.0, -1.0, 0.0])  # LPS -y
REFERENCE_AP_MM = 165.0  # adult cranial cavity length; zone offsets scale with the real one


class DefaceError(ValueError):
    """The volume cannot be defaced safely (e.g. no skull found): the work item is not made."""


@dataclass
class DefaceResult:
    volume: Volume  # the defaced copy (same grid, same dtype)
    replaced: np.ndarray  # bool (k, j, i): voxels whose value was replaced
    mode: str
    seconds: float
    protected: np.ndarray | None = None  # bool (k, j, i): never-written set (ichnode)
    intracranial: np.ndarray | None = None  # bool (k, j, i): the models' input mask (ichnode)
    info: dict = field(default_factory=dict)  # technical facts: anterior vector, its source...


def deface(volume: Volume, mode: Mode = "ichnode", *, seed: int = 0) -> DefaceResult:
    if mode == "mosmed":
        return deface_mosmed(volume, seed=seed)
    if mode == "ichnode":
        return deface_ichnode(volume)
    raise ValueError(f"unknown defacing mode {mode!r} (ichnode, mosmed)")


# -- geometry -----------------------------------------------------------------------------------
def _superior_k_increasing(affine: np.ndarray) -> bool:
    return float(affine[:3, 2] @ SUPERIOR) >= 0


def _copy_volume(volume: Volume, hu: np.ndarray) -> Volume:
    return Volume(hu=hu, affine=volume.affine.copy(),
                  sop_instance_uids=list(volume.sop_instance_uids), meta=dict(volume.meta))


# -- MosMed -------------------------------------------------------------------------------------
def deface_mosmed(volume: Volume, *, seed: int = 0, fraction: float = 0.6, rays: int = 9,
                  step_deg: float = 10.0, threshold_hu: float = 490.0,
                  axes_mm: tuple[float, float] = (10.0, 30.0),
                  values_hu: tuple[int, int] = (-1000, 1000)) -> DefaceResult:
    """The MosMed algorithm as published; parameters the paper leaves open are arguments."""
    from skimage.draw import ellipse
    from skimage.morphology import convex_hull_image

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    hu = volume.hu.copy()
    replaced = np.zeros(hu.shape, dtype=bool)
    _, row_mm, col_mm = volume.spacing
    n = hu.shape[0]
    order = range(n) if _superior_k_increasing(volume.affine) else range(n - 1, -1, -1)
    todo = list(order)[: int(round(fraction * n))]  # from the bottom of the head up
    angles = np.radians((np.arange(rays) - (rays - 1) / 2) * step_deg)
    for k in todo:
        bone = hu[k] > threshold_hu
        if bone.sum() < 3:
            continue
        hull = convex_hull_image(bone)
        rows, cols = np.nonzero(hull)
        cy, cx = rows.mean(), cols.mean()
        for angle in angles:
            # "Front of the image" = decreasing row index; rotate by the ray's angle.
            dy, dx = -np.cos(angle), np.sin(angle)
            y, x = _ray_exit(hull, cy, cx, dy, dx)
            a = rng.uniform(*axes_mm) / row_mm
            b = rng.uniform(*axes_mm) / col_mm
            rr, cc = ellipse(y, x, a, b, shape=hull.shape, rotation=rng.uniform(0, np.pi))
            hu[k, rr, cc] = rng.integers(values_hu[0], values_hu[1], size=rr.size)
            replaced[k, rr, cc] = True
    return DefaceResult(_copy_volume(volume, hu), replaced, "mosmed", time.perf_counter() - start,
                        info={"slices_processed": len(todo)})


def _ray_exit(mask: np.ndarray, y: float, x: float, dy: float, dx: float) -> tuple[float, float]:
    """Last point inside ``mask`` walking from (y, x) along (dy, dx) in half-pixel steps."""
    h, w = mask.shape
    last = (y, x)
    for t in np.arange(0, h + w, 0.5):
        yy, xx = y + t * dy, x + t * dx
        iy, ix = int(round(yy)), int(round(xx))
        if not (0 <= iy < h and 0 <= ix < w) or not mask[iy, ix]:
            break
        last = (yy, xx)
    return last


# -- ichnode ------------------------------------------------------------------------------------
@dataclass
class IchnodeParams(CavityParams):
    """Cavity finding (shared with the models' input mask) plus the face-zone geometry."""

    soft_margin_mm: float = 4.0  # soft-tissue-valued voxels this close are protected too
    top_mm: float = 5.0  # face zone ends this far above the cavity centroid (x scale)
    back_mm: float = -70.0  # ... and this far behind it (ears reach back ~6 cm) (x scale)
    # In front of the cavity the zone reaches at least this far above the anterior cranial fossa
    # floor (the orbital roofs), which rises with the face when the chin is down (x scale).
    brow_mm: float = 30.0
    front_fraction: float = 0.5  # "in front": this share of the way from centre to frontal pole
    floor_fraction: float = 0.6  # ... the floor: 2nd height percentile of the cavity beyond this
    min_axis_ratio: float = 1.04  # long/short cavity axis: below, the axis is not trusted
    min_protrusion_mm: float = 8.0  # face vs back protrusion difference to trust the sign
    min_deep_offset_mm: float = 8.0  # deep cavity part this far off centre to trust the sign
    canal_lean_deg: float = 30.0  # spinal-canal protection cone below the cavity
    tip_mm: float = 25.0  # deepest part of the cavity whose posterior footprint is carried down
    canal_drift_mm: float = 15.0  # most the canal may drift sideways below the cavity
    canal_half_width_mm: float = 25.0  # canal footprint: this close to the midline
    # The cavity wall inside the face zone (orbital roofs, frontal bone): protected-shell voxels
    # outside the models' input that are bone (wall_from_hu, the cavity finder's upper content
    # bound) or partial-volume bone without brain near become one constant bone value. The
    # facial bone's own values are gone; a closed wall stays, so the cavity is found again on a
    # defaced copy.
    wall_hu: float | None = MODEL_BONE_HU  # None: keep the whole shell (no wall, no shell air)
    wall_from_hu: float = DENSE_BONE_HU  # = content_hu[1]: denser voxels are never cavity content
    # Dense bone in the models' own ring inside the face zone (orbital roofs, frontal bone at
    # the cavity's edge) becomes MODEL_BONE_HU, the one value the models see dense bone as:
    # its values are destroyed and the models' input does not change.
    ring_bone: bool = True
    # Partial-volume voxels of the shell (bone mixed with fat, air or brain) join the wall when
    # no brain-like voxel joined to the cavity is within reach: a voxel that is partly brain
    # touches one that is more brain. Fat and air values (never brain), and brain-like values
    # cut off from the cavity (orbital muscle, fat mixed with the roof), become air.
    brain_like_hu: tuple[float, float] = (-50.0, 150.0)
    brain_reach_mm: float = 1.2  # partial volume in plane; through plane, one slice
    brain_reach_through_mm: float = 2.5  # missed brain straight above/below the models' input
    # How far (geodesic, in plane) brain missed by the cavity may lie from the models' input.
    brain_join_mm: float | None = 4.0  # None: anywhere in the protected set
    # A head that moved during the rotation smears the brain-to-bone ramp over the motion's
    # length (2-6 mm on the phantoms): partial-volume voxels on a ramp rising from joined brain
    # are part brain and keep their values; see _rising_ramp.
    ramp_reach_mm: float = 6.0
    # A partial-volume voxel denser than the midpoint between brain and the local bone peak
    # (the densest voxel within ``bone_peak_mm`` in plane, one slice up or down) is more bone
    # than brain whatever its neighbours: it joins the wall even next to brain. The midpoint
    # never falls below ``bone_majority_floor_hu`` (a thin wall cut obliquely never reaches its
    # full density); dense real cortical bone (1500-2500 HU) puts it near or above 1000 HU.
    bone_peak_mm: float = 3.0
    bone_majority_floor_hu: float = 750.0
    brain_hu: float = 40.0


def deface_ichnode(volume: Volume, params: IchnodeParams | None = None) -> DefaceResult:
    p = params or IchnodeParams()
    start = time.perf_counter()
    try:
        found = find_cavity(volume, p)
    except CavityNotFound as exc:
        raise DefaceError(str(exc)) from exc
    grid, cavity, cavity_ml = found.grid, found.raw, found.ml
    head_c = largest_component(grid.hu > -300)  # the head, not the table or headrest
    centre, anterior, both_sides, cues = _face_direction(grid, cavity, head_c, p)
    cavity = found.mask  # with the foramen magnum fill
    # What the models will see: defacing may not change their view of it.
    intracranial = intracranial_mask(volume, p, found)
    # On the volume's grid, once: the loop below and the brain-like join both read them.
    protected_f, canal_f, soft_near_f = (grid.upsample(m)
                                         for m in _protected_set(grid, cavity, centre, p))
    # Never written, but for dense bone in the models' ring: their input and the canal.
    fixed_f = intracranial | canal_f
    brain_like, near_brain = _brain_like_at_cavity(volume, fixed_f, protected_f, p)
    extent = _extent_along(grid, cavity, anterior)
    scale = float(np.clip(extent / REFERENCE_AP_MM, 0.6, 1.4))
    top, back = p.top_mm * scale, p.back_mm * scale
    cavity_pts = grid.coordinates(found.raw) - centre
    fronts = [(d, *_front_of_cavity(cavity_pts, d, p.brow_mm * scale, p))
              for d in ((anterior, -anterior) if both_sides else (anterior,))]

    hu = volume.hu.copy()
    replaced = np.zeros(hu.shape, dtype=bool)
    protected = np.zeros(hu.shape, dtype=bool)
    for k in range(hu.shape[0]):
        prot = protected_f[k]
        xyz = _slice_coordinates(volume.affine, k, hu.shape[1:]) - centre
        v = xyz @ SUPERIOR
        zone = v < top
        for direction, front_start, front_top in fronts:
            zone |= ((xyz @ direction) > front_start) & (v < front_top)
        if not both_sides:
            zone &= (xyz @ anterior) > back
        wall = shell_air = np.zeros_like(zone)
        if p.wall_hu is not None:
            shell = zone & prot & ~fixed_f[k]
            keep = near_brain[k] | _rising_ramp(brain_like[k], volume.hu[k], shell,
                                                volume.spacing, p)
            keep &= ~_bone_majority(volume.hu, k, shell, volume.spacing, p)
            wall, shell_air = _wall_of_shell(volume.hu[k], shell, soft_near_f[k], brain_like[k],
                                             keep, p)
            hu[k][wall] = p.wall_hu
            if p.ring_bone:
                ring_bone = zone & intracranial[k] & (volume.hu[k] >= DENSE_BONE_HU)
                hu[k][ring_bone] = MODEL_BONE_HU
                wall = wall | ring_bone
        zone = (zone & ~prot) | shell_air
        hu[k][zone] = AIR_HU
        replaced[k] = zone | wall
        protected[k] = prot & ~replaced[k]
    changed_protected = int(np.count_nonzero(hu[protected] != volume.hu[protected]))
    if changed_protected:  # cannot happen by construction; the check is the proof
        raise AssertionError(f"{changed_protected} protected voxels changed")
    if not np.array_equal(keep_intracranial(hu, intracranial),
                          keep_intracranial(volume.hu, intracranial)):
        raise AssertionError("defacing changed what the models see")
    info = {"anterior_lps": [round(float(c), 4) for c in anterior], "both_sides": both_sides,
            "cavity_ml": round(cavity_ml, 1), "scale": round(scale, 3), **cues}
    return DefaceResult(_copy_volume(volume, hu), replaced, "ichnode", time.perf_counter() - start,
                        protected=protected, intracranial=intracranial, info=info)


def _front_of_cavity(pts: np.ndarray, direction: np.ndarray, brow: float,
                     p: IchnodeParams) -> tuple[float, float]:
    """(where "in front" starts along ``direction``, the zone's top there), in mm from the
    cavity centre, given the cavity's voxel positions ``pts`` relative to it. The top is
    ``brow`` above the floor of the cavity's front part (anterior cranial fossa, orbital roofs):
    with the chin down that floor rises, and the face with it.
    """
    a = pts @ direction
    front = float(a.max())
    floor = float(np.percentile((pts @ SUPERIOR)[a > p.floor_fraction * front], 2))
    return p.front_fraction * front, floor + brow


def _protected_set(grid: "CoarseGrid", cavity: np.ndarray, centre: np.ndarray,
                   p: IchnodeParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On the coarse grid: the set never replaced by air (cavity, its shell and margins,
    spinal canal); the spinal canal; and the brain-like margin (soft-valued voxels within ``soft_margin_mm``, whose dense voxels join
    the wall only when no joined brain is near)."""
    # The margin includes the coarse-grid slack, so that upsampling the coarse mask can never
    # leave a full-resolution cavity voxel unprotected.
    reach = p.margin_mm + grid.slack_mm
    # Through-plane, one whole slice counts as within the margin: a slice lying on a fossa
    # floor mixes brain and bone over its full thickness (partial volume across slices).
    sampling = grid.coarse_spacing.copy()
    sampling[0] = min(sampling[0], reach)
    # The voxel shell touching the cavity (26-neighbours) is always protected: where the wall
    # is cut obliquely those voxels are mostly bone by value but still partly brain.
    shell = ndimage.binary_dilation(cavity, structure=np.ones((3, 3, 3), dtype=bool))
    protected = ndimage.distance_transform_edt(~shell, sampling=sampling) <= reach
    # Brain in tight corners of the wall (frontal pole on the orbital roof) can be missed by
    # the cavity; it still has brain-like values. Protect such voxels farther out than bone.
    lo, hi = p.content_hu
    soft = (grid.hu > lo) & (grid.hu < hi)
    near = ndimage.distance_transform_edt(~cavity, sampling=grid.coarse_spacing)
    soft_near = soft & (near <= p.soft_margin_mm + grid.slack_mm)
    canal = np.zeros_like(protected)
    _protect_canal(canal, cavity, grid, centre, p)
    return protected | soft_near | canal, canal, soft_near


def _brain_like_at_cavity(volume: Volume, fixed: np.ndarray, protected: np.ndarray,
                          p: IchnodeParams) -> tuple[np.ndarray, np.ndarray]:
    """bool (k, j, i) pair: brain-like voxels of the protected set joined to the models' input,
    and the voxels within partial-volume reach of them.

    Joined: through brain-like voxels in the same slice, at most ``brain_join_mm`` from the
    models' input (brain the cavity missed in a corner of the wall lies within ~4 mm; farther
    paths on thick slices run into the orbit), then straight above or below (a slice lying on a
    fossa floor). Not sideways through a neighbouring slice: on thick slices that path
    runs from the frontal lobe down into the slice below and across it into the orbit, where fat
    mixed with the roof reads brain-like.
    """
    lo, hi = p.brain_like_hu
    like = (volume.hu > lo) & (volume.hu < hi)
    allowed = like & protected
    seeds = like & fixed
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    vertical = np.zeros((3, 3, 3), dtype=bool)
    vertical[:, 1, 1] = True
    dk, dj, di = (float(v) for v in volume.spacing)
    slices = max(1, int(round(p.brain_reach_through_mm / dk)))
    if p.brain_join_mm is None:
        joined = ndimage.binary_propagation(seeds, structure=in_plane, mask=allowed)
    else:
        steps = max(1, int(np.ceil(p.brain_join_mm / min(dj, di))))
        joined = ndimage.binary_dilation(seeds, structure=in_plane, iterations=steps, mask=allowed)
    joined |= ndimage.binary_dilation(joined, structure=vertical, iterations=slices, mask=allowed)
    # Partial volume reaches about a millimetre in plane (more than one pixel of a fine
    # matrix) and one slice through plane.
    rj, ri = (max(1, int(round(p.brain_reach_mm / d))) for d in (dj, di))
    jj, ii = np.ogrid[-rj:rj + 1, -ri:ri + 1]
    disk = (jj * dj) ** 2 + (ii * di) ** 2 <= max(p.brain_reach_mm, dj, di) ** 2 + 1e-6
    return joined, ndimage.binary_dilation(joined, structure=np.repeat(disk[None], 3, axis=0))


def _rising_ramp(joined: np.ndarray, hu: np.ndarray, shell: np.ndarray, spacing,
                 p: IchnodeParams) -> np.ndarray:
    """bool (j, i): partial-volume voxels (``brain_like_hu[1]`` up to ``wall_from_hu``) of one
    slice reached from brain-like voxels joined to the cavity by in-plane steps whose values
    never fall, at most ``ramp_reach_mm`` away (counted in pixel steps, diagonals as one).

    Such a path climbs the ramp from brain to bone. Motion smears that ramp over millimetres
    and its voxels stay part brain. A partial voxel on the far side of a bony wall (orbital
    roof mixed with orbital fat) is not reached: the values fall past the peak.
    """
    partial = (hu >= p.brain_like_hu[1]) & (hu < p.wall_from_hu)
    out = np.zeros_like(shell)
    if not (shell & partial).any() or not joined.any():
        return out
    dj, di = float(spacing[1]), float(spacing[2])
    steps = max(1, int(np.ceil(p.ramp_reach_mm / min(dj, di))))
    # Only the shell's bounding box (plus the reach) can matter.
    box = _box_around(shell & partial, steps, steps)
    h = np.pad(hu[box].astype(np.float32), 1, constant_values=np.inf)
    got = np.pad(joined[box], 1)
    part = np.pad(partial[box], 1)
    n_j, n_i = got.shape
    inner = (slice(1, n_j - 1), slice(1, n_i - 1))
    for _ in range(steps):
        new = np.zeros_like(got)
        for sj in (-1, 0, 1):
            for si in (-1, 0, 1):
                if sj or si:
                    src = (slice(1 + sj, n_j - 1 + sj), slice(1 + si, n_i - 1 + si))
                    new[inner] |= got[src] & (h[inner] >= h[src])
        new &= part & ~got
        if not new.any():
            break
        got |= new
    out[box] = got[inner] & part[inner]
    return out


def _bone_majority(hu: np.ndarray, k: int, shell: np.ndarray, spacing,
                   p: IchnodeParams) -> np.ndarray:
    """bool (j, i): voxels of slice ``k``'s ``shell`` that are more bone than brain by value:
    at least halfway from ``brain_hu`` to the local bone peak (``bone_peak_mm``), and at
    least ``bone_majority_floor_hu``.

    A voxel mixing brain with bone of peak value B reads brain + f (B - brain) for a bone
    fraction f; f > 0.5 is "not brain", whatever brain lies next to it.
    """
    out = np.zeros_like(shell)
    candidates = shell & (hu[k] >= p.bone_majority_floor_hu)
    if not candidates.any():
        return out
    dj, di = float(spacing[1]), float(spacing[2])
    rj, ri = (max(1, int(round(p.bone_peak_mm / d))) for d in (dj, di))
    box = _box_around(candidates, rj, ri)
    near = hu[max(0, k - 1):k + 2, box[0], box[1]]
    peak = ndimage.maximum_filter(near.max(axis=0), size=(2 * rj + 1, 2 * ri + 1))
    out[box] = candidates[box] & (hu[k][box] >= (peak + p.brain_hu) / 2)
    return out


def _box_around(mask: np.ndarray, rj: int, ri: int) -> tuple[slice, slice]:
    """The bounding box of a non-empty 2D ``mask`` grown by ``rj``/``ri`` pixels (clipped at 0)."""
    js, is_ = np.nonzero(mask)
    return (slice(max(0, js.min() - rj), js.max() + rj + 1),
            slice(max(0, is_.min() - ri), is_.max() + ri + 1))


def _wall_of_shell(hu: np.ndarray, shell: np.ndarray, soft_near: np.ndarray,
                   brain_like: np.ndarray, near_brain: np.ndarray,
                   p: IchnodeParams) -> tuple[np.ndarray, np.ndarray]:
    """(wall, air) in one slice's writable shell (face zone, protected, outside the models'
    input): which voxels become the constant wall value and which become air.

    Wall: voxels of at least ``wall_from_hu`` (never cavity content) outside the brain-like
    margin, and partial-volume voxels touching no brain-like voxel joined to the cavity (bone
    mixed with fat, air or orbital tissue, not with brain). Air: fat and air values, which no
    voxel that is mostly brain has, and brain-like values cut off from the cavity (orbital
    muscle and globe). Brain joined to the cavity and partial voxels touching it keep their
    values.
    """
    lo, hi = p.brain_like_hu
    dense = hu >= p.wall_from_hu
    wall = shell & ((dense & ~soft_near) | ((hu >= hi) & ~near_brain))
    air = shell & ((hu <= lo) | ((hu < hi) & ~brain_like))
    return wall, air


def _slice_coordinates(affine: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    j, i = np.indices(shape, dtype=np.float64)
    base = affine[:3, 3] + k * affine[:3, 2]
    return base + i[..., None] * affine[:3, 0] + j[..., None] * affine[:3, 1]


def _protect_canal(protected: np.ndarray, cavity: np.ndarray, grid: CoarseGrid,
                   centre: np.ndarray, p: IchnodeParams) -> None:
    """Protect the spinal canal below the posterior fossa (in place).

    Below the foramen magnum the canal often has no closed bony ring in any slice, so it is not
    found as cavity, and with the chin up it hangs below the cavity's lowest slice. Every voxel
    under the footprint of the deep, posterior part of the cavity (posterior fossa, foramen
    magnum; straight below along patient z because slices step along z) is protected, in a cone
    that widens downwards (the canal leans with head flexion). The face is in front of it.
    """
    if not cavity.any():
        return
    z = grid.z_of_voxels()
    z_tip = float(z[cavity].min()) + p.tip_mm
    tip = cavity & (z < z_tip)
    post_dir = posterior_dir(grid, cavity, centre)
    if post_dir is not None:
        k, j, i = np.nonzero(tip)
        xyz = (grid.affine @ np.vstack([i, j, k, np.ones_like(i)]))[:3].T
        rel = xyz - centre
        # Behind the centre and near the midline: the canal, not the whole posterior fossa
        # floor (whose footprint would reach the ears).
        keep = (rel @ post_dir > -p.skull_base_front_mm) & (
            np.abs(rel @ np.cross(SUPERIOR, post_dir)) <= p.canal_half_width_mm)
        tip = np.zeros_like(tip)
        tip[k[keep], j[keep], i[keep]] = True
    footprint = tip.any(axis=0)
    if not footprint.any():
        return
    dist = ndimage.distance_transform_edt(~footprint, sampling=grid.coarse_spacing[1:])
    reach = p.margin_mm + grid.slack_mm
    lean = np.minimum(np.tan(np.radians(p.canal_lean_deg)) * np.maximum(z_tip - z, 0),
                      p.canal_drift_mm)
    protected |= (z < z_tip) & (dist[None] <= reach + lean)


def _face_direction(grid: CoarseGrid, cavity: np.ndarray, head: np.ndarray,
                    p: IchnodeParams) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """Centre of the cavity, anterior unit vector (axial plane), and whether to treat both sides.

    The axis is the cavity's long axis in the axial plane. Its sign comes from two image cues:
    the deepest part of the cavity (posterior fossa, foramen magnum) lies behind the centre, and
    the face protrudes farther beyond the skull than the occiput (weak when the field of view
    cuts the nose). IOP gives the patient's anterior; a head turned by less than 90 degrees keeps
    the face on that side. Agreeing cues decide; doubt means both sides are defaced.
    """
    body = main_body(cavity)
    pts = grid.coordinates(body)
    centre = pts.mean(axis=0)
    xy = pts[:, :2] - centre[:2]
    evals, evecs = np.linalg.eigh(np.cov(xy.T))
    axis = np.array([evecs[0, 1], evecs[1, 1], 0.0])  # largest eigenvalue last
    ratio = float(np.sqrt(evals[1] / max(evals[0], 1e-9)))
    cues: dict = {"axis_ratio": round(ratio, 3)}
    if ratio < p.min_axis_ratio:
        # Round skull in the axial plane: the axis means nothing; keep IOP's anterior and
        # treat both sides as face.
        cues["anterior_source"] = "iop (round cavity): both sides"
        return centre, ANTERIOR.copy(), True, cues
    axis = axis * (1.0 if axis @ ANTERIOR >= 0 else -1.0)  # IOP's side first
    votes = []
    deep = _deep_offset(grid, cavity, centre, axis)
    cues["deep_part_mm"] = round(deep, 1)
    if abs(deep) >= p.min_deep_offset_mm:
        votes.append(-np.sign(deep))  # the deep part is posterior
    protrusion = _protrusion(grid, body, head, centre, axis)
    cues["protrusion_mm"] = round(protrusion, 1)
    if abs(protrusion) >= p.min_protrusion_mm:
        votes.append(np.sign(protrusion))
    if not votes or len(set(votes)) > 1:
        cues["anterior_source"] = "image cues weak or disagree: both sides"
        return centre, axis, True, cues
    if votes[0] < 0:
        # The image puts the face on the side IOP calls posterior (head turned > 90 degrees or
        # a wrong orientation header): deface both sides rather than trust either alone.
        cues["anterior_source"] = "image contradicts iop: both sides"
        return centre, -axis, True, cues
    cues["anterior_source"] = "image axis; image cues and iop agree"
    return centre, axis, False, cues


def _deep_offset(grid: CoarseGrid, cavity: np.ndarray, centre: np.ndarray,
                 axis: np.ndarray) -> float:
    """Position along ``axis`` of the cavity's lowest 25 mm relative to the centre (mm)."""
    pts = grid.coordinates(cavity) - centre
    v = pts @ SUPERIOR
    deep = v < v.min() + 25.0
    if deep.sum() < 5 or v.min() > -40.0:  # the scan does not reach the skull base
        return 0.0
    return float(np.median(pts[deep] @ axis))


def _protrusion(grid: CoarseGrid, body: np.ndarray, head: np.ndarray, centre: np.ndarray,
                axis: np.ndarray) -> float:
    """How much farther soft tissue reaches beyond the cavity on the +axis than the -axis side.

    Measured in the band below the cavity centre (eyes, nose, upper jaw vs. occiput).
    """
    head_pts = grid.coordinates(head) - centre
    cav_pts = grid.coordinates(body) - centre
    band = (head_pts @ SUPERIOR < -10.0) & (head_pts @ SUPERIOR > -60.0)
    if band.sum() < 10:
        return 0.0
    u_head = head_pts[band] @ axis
    u_cav = cav_pts @ axis
    front = np.percentile(u_head, 99.5) - np.percentile(u_cav, 99.5)
    back = -np.percentile(u_head, 0.5) + np.percentile(u_cav, 0.5)
    return float(front - back)


def _extent_along(grid: CoarseGrid, cavity: np.ndarray, axis: np.ndarray) -> float:
    u = (grid.coordinates(main_body(cavity)) @ axis)
    return float(np.percentile(u, 99) - np.percentile(u, 1))


def head_frame(volume: Volume,
               params: IchnodeParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cranial-cavity centre in LPS mm, anterior unit vector) as the ichnode mode finds them."""
    p = params or IchnodeParams()
    try:
        found = find_cavity(volume, p)
    except CavityNotFound as exc:
        raise DefaceError(str(exc)) from exc
    centre, anterior, _both, _cues = _face_direction(found.grid, found.raw, found.grid.hu > -300, p)
    return centre, anterior
