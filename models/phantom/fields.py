"""Signed distance primitives, smooth noise and the painting canvas of the model grid.

Everything is vectorised numpy on blocks of the model grid: a primitive is evaluated only inside
the index box that its head-frame bounding box maps to. Smooth fields (large ellipsoids, noise,
the brain warp) are evaluated on a grid 2-4x coarser in-plane and linearly upsampled, which is
exact enough for them and several times cheaper.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
from scipy import ndimage

from models.phantom.geometry import Geometry, upsample_axis
from models.phantom.spec import rng_for

F32 = np.float32


# ---- signed distance primitives (head-frame mm; negative inside) --------------------------

def ellipsoid(x, y, z, c, r):
    """Approximate signed distance to an axis-aligned ellipsoid (exact near the surface)."""
    c = [float(v) for v in c]
    ir = [1.0 / float(v) for v in r]
    px, py, pz = (x - c[0]) * ir[0], (y - c[1]) * ir[1], (z - c[2]) * ir[2]
    k0 = np.sqrt(px * px + py * py + pz * pz)
    qx, qy, qz = px * ir[0], py * ir[1], pz * ir[2]
    k1 = np.sqrt(qx * qx + qy * qy + qz * qz)
    return k0 * (k0 - 1.0) / np.maximum(k1, F32(1e-6))


def capsule(x, y, z, a, b, r, sx=1.0, sy=1.0, sz=1.0):
    """Distance to segment a-b minus radius; optional axis scales flatten the cross-section.
    (Scalars are Python floats so float32 arrays stay float32 under NumPy 2 promotion.)"""
    a = [float(v) for v in a]
    ab = [float(v) - u for v, u in zip(b, a)]
    inv = 1.0 / (ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2)
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * (ab[0] * inv) + py * (ab[1] * inv) + pz * (ab[2] * inv)), 0.0, 1.0)
    dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    if sx != 1.0:
        dx = dx * float(sx)
    if sy != 1.0:
        dy = dy * float(sy)
    if sz != 1.0:
        dz = dz * float(sz)
    rr = r(t) if callable(r) else float(r)
    return np.sqrt(dx * dx + dy * dy + dz * dz) - rr


def smin(a, b, k=4.0):
    """Smooth union of two distance fields (blend width k mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ---- smooth noise --------------------------------------------------------------------------

_LATTICES: dict[tuple[str, bool], tuple[np.ndarray, float]] = {}
LATTICE_N = 64  # periodic lattice; one period = 16 wavelengths


def _lattice(name: str, band: bool) -> tuple[np.ndarray, float]:
    """A periodic smooth random lattice (built once per process; seeds pick offsets/axes)."""
    key = (name, band)
    if key not in _LATTICES:
        rng = np.random.default_rng(zlib.crc32(("lattice:" + name).encode()))
        white = rng.standard_normal((LATTICE_N,) * 3).astype(F32)
        if band:
            lat = (ndimage.gaussian_filter(white, 0.9, mode="wrap")
                   - ndimage.gaussian_filter(white, 1.8, mode="wrap"))
        else:
            lat = ndimage.gaussian_filter(white, 1.2, mode="wrap")
        lat = (lat / lat.std()).astype(F32)
        g = np.gradient(lat)
        grad = float(np.mean(np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)))  # per lattice step
        _LATTICES[key] = (lat, grad)
    return _LATTICES[key]


class Noise:
    """Reproducible smooth 3D random field (unit SD), sampled by trilinear interpolation.

    ``band`` gives a band-pass (difference of Gaussians) field whose zero set is a maze of
    curved sheets: the gyri/sulci pattern of the cortex. Each study sees the shared periodic
    lattice through its own random offset, axis order and flips.
    """

    def __init__(self, seed: int, name: str, wavelength: float, band: bool = False):
        self.lattice, g = _lattice(name, band)
        self.step = wavelength / 4.0
        self.grad_mm = g / self.step  # mean |gradient| per mm: |n| / grad_mm ~ distance to 0
        rng = rng_for(seed, "noise:" + name)
        self.offset = rng.uniform(0, LATTICE_N, 3)
        self.perm = rng.permutation(3)
        self.flip = rng.choice([-1.0, 1.0], 3)

    def __call__(self, x, y, z):
        v = (x, y, z)
        s = 1.0 / self.step
        coords = np.stack([np.asarray(v[self.perm[a]], F32) * F32(self.flip[a] * s)
                           + F32(self.offset[a]) for a in range(3)])
        shape = coords.shape[1:]
        return ndimage.map_coordinates(self.lattice, coords.reshape(3, -1), order=1,
                                       mode="grid-wrap", prefilter=False).reshape(shape)


# ---- canvas ---------------------------------------------------------------------------------

class Canvas:
    """HU and label fractions on the model grid, painted primitive by primitive."""

    def __init__(self, geom: Geometry):
        self.geom = geom
        self.shape = geom.model_shape
        self.m = geom.head_matrix(model=True).astype(np.float64)  # index -> head frame
        full = np.eye(4)
        full[:3] = self.m
        self.minv = np.linalg.inv(full)
        p = geom.model_affine  # index -> patient
        self.pm = p[:3].astype(np.float64)
        self.hu = np.full(self.shape, -1000.0, F32)
        self.labels: dict[str, np.ndarray] = {}
        # in-plane ramp width and slab thickness (in head-frame units)
        self.w_xy = F32(geom.model_pixel / geom.scale)
        self.slab = F32(geom.thickness / geom.normal_spacing)  # in units of one k step
        self.full = (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    # index boxes ---------------------------------------------------------------------------
    def box(self, lo, hi, margin: float = 3.0):
        """Index slices covering the head-frame box [lo, hi] (+margin); None if outside."""
        lo = np.asarray(lo, float) - margin
        hi = np.asarray(hi, float) + margin
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        idx = (self.minv[:3, :3] @ corners.T + self.minv[:3, 3:4]).T  # (8, 3) as i, j, k
        mn = np.floor(idx.min(0)).astype(int)
        mx = np.ceil(idx.max(0)).astype(int) + 1
        k0, k1 = max(mn[2], 0), min(mx[2], self.shape[0])
        j0, j1 = max(mn[1], 0), min(mx[1], self.shape[1])
        i0, i1 = max(mn[0], 0), min(mx[0], self.shape[2])
        if k0 >= k1 or j0 >= j1 or i0 >= i1:
            return None
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    def coords(self, sl, step: int = 1, patient: bool = False):
        """Head-frame (or patient) x, y, z of the block's voxels (every ``step`` in-plane)."""
        m = self.pm if patient else self.m
        k = np.arange(sl[0].start, sl[0].stop, dtype=np.float64)[:, None, None]
        j = np.arange(sl[1].start, sl[1].stop + step - 1 if step > 1 else sl[1].stop, step,
                      dtype=np.float64)[None, :, None]
        i = np.arange(sl[2].start, sl[2].stop + step - 1 if step > 1 else sl[2].stop, step,
                      dtype=np.float64)[None, None, :]
        out = []
        for r in range(3):
            ij = (m[r, 0] * i + m[r, 1] * j + m[r, 3]).astype(F32)
            out.append(ij + (m[r, 2] * k).astype(F32))
        return out

    def coarse(self, fn, sl, step: int = 4):
        """Evaluate ``fn(x, y, z)`` every ``step`` pixels in-plane, upsample linearly to ``sl``."""
        nj = sl[1].stop - sl[1].start
        ni = sl[2].stop - sl[2].start
        if step <= 1 or min(nj, ni) < 2 * step:
            return fn(*self.coords(sl))
        vals = fn(*self.coords(sl, step))
        out = upsample_axis(vals, 2, ni, lambda d: d / step)
        return upsample_axis(out, 1, nj, lambda d: d / step)

    # partial volume ------------------------------------------------------------------------
    def soft(self, sdf, width=None):
        """Volume fraction inside (sdf < 0): a linear ramp over the in-plane pixel and the
        slab thickness projected on the surface normal (partial-volume effect)."""
        w = self.w_xy if width is None else width
        if sdf.shape[0] > 1 and self.slab > 0.3:
            g = np.abs(np.gradient(sdf, axis=0)) * self.slab
            w = np.maximum(w, g)
        return np.clip(F32(0.5) - sdf / w, 0.0, 1.0)

    # painting ------------------------------------------------------------------------------
    def paint(self, sl, frac, value):
        h = self.hu[sl]
        h += frac * (value - h)

    def label(self, name: str, sl, frac, op: str = "max"):
        arr = self.labels.get(name)
        if arr is None:
            arr = self.labels[name] = np.zeros(self.shape, F32)
        if op == "max":
            np.maximum(arr[sl], frac, out=arr[sl])
        elif op == "set":
            arr[sl] = frac
        elif op == "sub":  # remove where frac (e.g. a structure painted over it)
            arr[sl] *= 1.0 - frac
