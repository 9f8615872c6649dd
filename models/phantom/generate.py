"""generate_study: spec -> volume + masks + ground truth."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from models.phantom.anatomy import HeadModel, Warp
from models.phantom.fields import F32, Canvas
from models.phantom.geometry import Geometry, build_geometry
from models.phantom.lesions import Lesion, LesionPainter, mass_effect, plan_lesions
from models.phantom.physics import add_motion, add_streaks, finish
from models.phantom.spec import SUBTYPES, VENDORS, PhantomSpec, rng_for
from models.volume import Volume

MASK_NAMES = ("brain", "skull", "face", "ears", "ventricle_left", "ventricle_right",
              "ventricle_other", "hematoma", *SUBTYPES, "midline")


EXCLUDES = {"skull": ("brain",), "face": ("brain",), "ears": ("face",)}
# Masks whose volume is measured (hematoma, ventricles) keep the painted volume when upsampled;
# the anatomy masks (brain, face, ...) stay "voxels that are mostly this tissue", which is what
# "no brain voxel changed" and "share of facial voxels destroyed" are counted on.
VOLUME_MASKS = frozenset({*SUBTYPES, "ventricle_left", "ventricle_right", "ventricle_other"})


class LazyMasks(Mapping):
    """Boolean full-resolution masks, upsampled from the model grid on first access (a mask
    nobody reads costs nothing). Behaves like a read-only dict."""

    def __init__(self, fractions: dict[str, np.ndarray], factor: int, shape):
        self._frac = fractions
        self._f = factor
        self._shape = shape
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in MASK_NAMES:
                raise KeyError(name)
            frac = self._frac.get(name)
            if name == "hematoma":
                # The union of the subtypes, so each hematoma voxel has a subtype at 512 too
                # (at f = 1 this equals thresholding the hematoma's own fraction).
                self._cache[name] = np.logical_or.reduce([self[s] for s in SUBTYPES])
            elif frac is None:
                self._cache[name] = np.zeros(self._shape, bool)
            else:
                mask = upsample_mask(frac, self._f, preserve_volume=name in VOLUME_MASKS)
                for other in EXCLUDES.get(name, ()):  # keep boundary voxels in one mask only
                    mask &= ~self[other]
                self._cache[name] = mask
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(MASK_NAMES)

    def __len__(self) -> int:
        return len(MASK_NAMES)


def upsample_mask(frac: np.ndarray, f: int, preserve_volume: bool = False) -> np.ndarray:
    """Fraction on the model grid -> bool mask on the output grid, upsampling only the
    bounding box of non-zero values (equal to upsampling everything, much cheaper).

    Default: output voxels whose linearly interpolated fraction is at least 0.5 (mostly this
    tissue). ``preserve_volume``: a model voxel of fraction p becomes about p * f * f of its
    f x f output voxels, the ones where the interpolated fraction is highest (so edges stay
    smooth). The threshold drops thin shells: a one-voxel subdural rim of fraction just over 0.5
    interpolates below 0.5 everywhere, and truth masks at 512 held half the blood of 256.
    """
    k, nj, ni = frac.shape
    out = np.zeros((k, nj * f, ni * f), bool)
    nz = frac > 0
    if not nz.any():
        return out
    ks = np.flatnonzero(nz.any(axis=(1, 2)))
    js = np.flatnonzero(nz.any(axis=(0, 2)))
    is_ = np.flatnonzero(nz.any(axis=(0, 1)))
    k0, k1 = ks[0], ks[-1] + 1
    j0, j1 = max(js[0] - 1, 0), min(js[-1] + 2, nj)
    i0, i1 = max(is_[0] - 1, 0), min(is_[-1] + 2, ni)
    sub = frac[k0:k1, j0:j1, i0:i1]
    if f == 1:
        out[k0:k1, j0:j1, i0:i1] = sub >= 0.5
        return out
    up = _interpolated(sub, f, (j0, i0))
    out[k0:k1, j0 * f:j1 * f, i0 * f:i1 * f] = (
        _volume_preserving(sub, up, f, (j0, i0)) if preserve_volume else up >= 0.5)
    return out


def _interpolated(sub: np.ndarray, f: int, origin: tuple[int, int]) -> np.ndarray:
    from models.phantom.geometry import upsample_axis

    def src(offset):
        return lambda d: (d + offset * f + 0.5) / f - 0.5 - offset

    up = upsample_axis(sub, 2, sub.shape[2] * f, src(origin[1]))
    return upsample_axis(up, 1, sub.shape[1] * f, src(origin[0]))


def _volume_preserving(sub: np.ndarray, up: np.ndarray, f: int,
                       origin: tuple[int, int]) -> np.ndarray:
    nk, nj, ni = sub.shape
    # (k, j, f, i, f) -> (k, j, i, f*f): the output voxels of each model voxel, side by side.
    blocks = up.reshape(nk, nj, f, ni, f).transpose(0, 1, 3, 2, 4).reshape(nk, nj, ni, f * f)
    keep = _dithered_counts(np.clip(sub, 0, 1) * (f * f), origin)
    rank = np.argsort(np.argsort(-blocks, axis=-1, kind="stable"), axis=-1, kind="stable")
    chosen = rank < keep[..., None]
    return chosen.reshape(nk, nj, ni, f, f).transpose(0, 1, 3, 2, 4).reshape(nk, nj * f, ni * f)


_BAYER4 = (np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) + 0.5) / 16


def _dithered_counts(expected: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """Integer counts whose sum follows ``expected`` without bias: rounding alone turns a rim
    of fraction 0.6 into 2 of 4 voxels everywhere (-17 % volume); an ordered dither (fixed by
    the model-grid position, so deterministic) gives 3 in 40 % of voxels."""
    nk, nj, ni = expected.shape
    jj = (np.arange(nj) + origin[0])[:, None] % 4
    ii = (np.arange(ni) + origin[1])[None, :] % 4
    return np.floor(expected + _BAYER4[jj, ii]).astype(np.intp)


@dataclass
class PhantomStudy:
    spec: PhantomSpec  # resolved: every parameter filled in
    volume: Volume
    masks: Mapping[str, np.ndarray]
    truth: dict
    geometry: Geometry
    lesions: list[Lesion] = field(default_factory=list)
    canvas: Canvas | None = field(default=None, repr=False)  # model grid, for extra series

    @property
    def seed(self) -> int:
        return self.spec.seed

    def head_coords(self, mask: np.ndarray) -> np.ndarray:
        """Head-frame coordinates (N, 3) of a mask's voxels (x left, y posterior, z up; mm
        at head scale 1): lets tests check anatomy-relative facts (sides, sutures)."""
        k, j, i = np.nonzero(mask)
        idx = np.stack([i, j, k, np.ones_like(i)]).astype(float)
        return (self.geometry.head_matrix(model=False) @ idx).T


def _face_fraction(c: Canvas) -> np.ndarray:
    """Facial soft tissue and bone: everything of the head in front of the orbits' apex and
    below the brow, outside the cranial cavity."""
    sl = c.full
    x, y, z = c.coords(sl, step=1)
    tissue = c.soft(c.env)
    if "ears" in c.labels:
        tissue = np.maximum(tissue, 0)
    region = np.clip(0.5 - (y + 42.0) / c.w_xy, 0, 1) * np.clip(0.5 - (z + 6.0) / c.w_xy, 0, 1)
    brain = c.labels.get("brain", 0)
    return (tissue * region * (1 - brain)).astype(F32)


def generate_study(spec: PhantomSpec) -> PhantomStudy:
    s = spec.resolved()
    geom = build_geometry(s)
    c = Canvas(geom)
    lesions = plan_lesions(s)
    shift, vent_scale = mass_effect(lesions)
    warp = Warp(shift)
    head = HeadModel(s, c, warp)
    head.vent_side_scale = vent_scale
    head.paint_all()
    LesionPainter(s, c, head).paint(lesions)
    # ventricle labels include the third/fourth only through "ventricle_other" (not exported)
    c.labels["face"] = _face_fraction(c)

    r = rng_for(s.seed, "artefacts")
    c.bone_score = add_streaks(c, r)
    c.labels.pop("_petrous", None)
    motion_slices = add_motion(c, r) if s.motion else []
    hu = finish(c, s)

    masks = LazyMasks(c.labels, geom.factor, geom.shape)
    vox_ml = float(abs(np.linalg.det(geom.affine[:3, :3]))) / 1000.0
    truth = _truth(s, geom, masks, lesions, warp, vox_ml, motion_slices, head)
    meta = _meta(s, geom)
    vol = Volume(hu=hu, affine=geom.affine.copy(), meta=meta)
    return PhantomStudy(spec=s, volume=vol, masks=masks, truth=truth, geometry=geom,
                        lesions=lesions, canvas=c)


def _truth(s, geom, masks, lesions, warp, vox_ml, motion_slices, head) -> dict:
    present = {st: st in s.subtypes for st in SUBTYPES}
    slice_labels = {}
    vols = {}
    for st in SUBTYPES:
        m = masks[st] if present[st] else None
        if m is None:
            slice_labels[st] = [False] * geom.shape[0]
            vols[st] = 0.0
        else:
            slice_labels[st] = [bool(v) for v in m.any(axis=(1, 2))]
            vols[st] = round(float(m.sum()) * vox_ml, 3)
    hem = masks["hematoma"]
    slice_labels["any"] = [bool(v) for v in hem.any(axis=(1, 2))]
    study_labels = {st: bool(any(slice_labels[st])) for st in SUBTYPES}
    study_labels["any"] = bool(any(slice_labels["any"]))
    return {
        "seed": s.seed,
        "study_labels": study_labels,
        "slice_labels": slice_labels,
        "hematoma_volume_ml": round(float(hem.sum()) * vox_ml, 3),
        "volume_ml": vols,
        "target_volume_ml": {les.subtype: les.target_ml for les in lesions},
        "midline_shift_mm": round(abs(warp.septum_shift()) * geom.scale, 2),
        "midline_shift_direction": "left" if warp.shift > 0 else ("right" if warp.shift < 0
                                                                  else "none"),
        "ventricle_left_ml": round(float(masks["ventricle_left"].sum()) * vox_ml, 3),
        "ventricle_right_ml": round(float(masks["ventricle_right"].sum()) * vox_ml, 3),
        "voxel_ml": vox_ml,
        "lesions": [{"subtype": les.subtype, "side": {1: "left", -1: "right", 0: "midline"}[
            les.side], **{k: _plain(v) for k, v in les.params.items()}} for les in lesions],
        "motion_slices": motion_slices,
        "calcifications": int(getattr(head.c, "calcifications", 0)),
        "acquisition": s.to_dict(),
    }


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_plain(x) for x in v]
    return v


def _meta(s: PhantomSpec, geom: Geometry) -> dict:
    manufacturer, models, soft, bone = VENDORS[s.vendor]
    r = rng_for(s.seed, "vendor")
    return {
        "manufacturer": manufacturer,
        "model": str(r.choice(models)),
        "kernel": str(r.choice(bone if s.kernel == "bone" else soft)),
        "kernel_look": s.kernel,
        "kvp": s.kvp,
        "ma": s.ma,
        "exposure_time_ms": s.exposure_time_ms,
        "slice_thickness_mm": s.slice_thickness_mm,
        "spacing_between_slices_mm": round(geom.normal_spacing, 6),
        "gantry_tilt_deg": s.tilt_deg,
        "pixel_spacing_mm": geom.pixel,
        "phantom_seed": s.seed,
    }
