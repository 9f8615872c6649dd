"""Scanner geometry of a phantom study: slice planes (with gantry tilt), head pose, grids.

Frames:
- patient (LPS, mm): what DICOM IPP/IOP describe; gravity points to +y (supine patient).
- head frame (mm): x to the patient's left, y posterior, z superior, origin near the centre of the
  cranial cavity. Anatomy is defined here; the head pose (rotation + offset) maps it into the
  patient frame: ``p = R @ h + centre``.

Output grid index (i, j, k) = (column, row, slice). With gantry tilt ``t`` the image column
direction is ``(0, cos t, -sin t)`` (image rows move inferior as they go posterior, as when
slices follow the orbito-meatal line) and consecutive slices are one table step apart along
patient z, so the affine is sheared, exactly as a tilted scanner writes IPP/IOP.

Anatomy is rendered on a *model grid*: the output grid with the in-plane matrix reduced to at
most 256 (about 0.7-1.1 mm pixels, the resolution of a soft-tissue kernel), then upsampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.phantom.spec import PhantomSpec, rng_for

MODEL_MAX = 256


def rotation(yaw_deg: float, roll_deg: float, pitch_deg: float) -> np.ndarray:
    """Head rotation in LPS: yaw about z, roll about y, pitch about x (positive = chin down)."""
    a, b, c = np.radians([yaw_deg, roll_deg, pitch_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


# Head outer envelope in the head frame (before head_scale), used to size the scan range.
HEAD_CENTRE = np.array([0.0, 5.0, -8.0])
HEAD_RADII = np.array([81.0, 99.0, 85.0])


@dataclass
class Geometry:
    shape: tuple[int, int, int]  # output (K, N, N)
    affine: np.ndarray  # output index (i, j, k, 1) -> LPS
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    factor: int  # output pixels per model pixel
    rot: np.ndarray  # head frame -> patient rotation
    centre: np.ndarray  # head-frame origin in patient coordinates
    tilt_deg: float
    thickness: float
    increment: float
    pixel: float  # output pixel spacing
    scale: float  # head size factor (anatomy is defined for scale 1 and scaled)

    @property
    def model_pixel(self) -> float:
        return self.pixel * self.factor

    @property
    def normal(self) -> np.ndarray:
        a = self.affine[:3, :3]
        n = np.cross(a[:, 0], a[:, 1])
        return n / np.linalg.norm(n)

    @property
    def normal_spacing(self) -> float:
        """Distance between slice planes along their normal."""
        return float(self.affine[:3, 2] @ self.normal)

    def head_matrix(self, model: bool = True) -> np.ndarray:
        """3x4: grid index (i, j, k, 1) -> head-frame mm (divided by ``scale``)."""
        to_head = np.eye(4)
        to_head[:3, :3] = self.rot.T / self.scale
        to_head[:3, 3] = -self.rot.T @ self.centre / self.scale
        return (to_head @ (self.model_affine if model else self.affine))[:3]

    def head_to_patient(self, h: np.ndarray) -> np.ndarray:
        return (self.rot @ (np.asarray(h, float) * self.scale).T).T + self.centre


def build_geometry(spec: PhantomSpec) -> Geometry:
    """Slice planes and head pose of a resolved spec."""
    n = spec.matrix
    pixel = spec.pixel_spacing_mm * 512 / n
    nm = min(n, MODEL_MAX)
    f = n // nm
    tilt = np.radians(spec.tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    dz = spec.slice_increment_mm
    rot = rotation(spec.yaw_deg, spec.roll_deg, spec.pitch_deg)
    table_z = float(rng_for(spec.seed, "table").uniform(-260, -120))
    centre = np.array([spec.offset_mm[0], spec.offset_mm[1], table_z])
    scale = spec.head_scale

    # k(p) for slices through the recon centre (0, 0, z): plane normal n = (0, sin t, cos t).
    nrm = np.array([0.0, np.sin(tilt), np.cos(tilt)])
    start = centre + rot @ (np.array([0, 0, spec.scan_start_mm]) * scale)
    z0 = start[2] + start[1] * np.tan(tilt)
    # Highest k the head reaches: support function of the head envelope along n / (dz cos t).
    c = centre + rot @ (HEAD_CENTRE * scale)
    top = c @ nrm + np.linalg.norm(HEAD_RADII * scale * (rot.T @ nrm))
    k_top = (top - np.array([0, 0, z0]) @ nrm) / (dz * np.cos(tilt))
    k = int(np.ceil(k_top)) + 1 + spec.blank_slices

    affine = np.eye(4)
    affine[:3, 0] = row * pixel
    affine[:3, 1] = col * pixel
    affine[:3, 2] = [0, 0, dz]
    affine[:3, 3] = np.array([0, 0, z0]) - (n - 1) / 2 * pixel * (row + col)
    s = np.eye(4)
    s[0, 0] = s[1, 1] = f
    s[0, 3] = s[1, 3] = (f - 1) / 2
    return Geometry(shape=(k, n, n), affine=affine, model_shape=(k, nm, nm),
                    model_affine=affine @ s, factor=f, rot=rot, centre=centre,
                    tilt_deg=float(spec.tilt_deg), thickness=float(spec.slice_thickness_mm),
                    increment=float(dz), pixel=float(pixel), scale=float(scale))


def upsample_axis(a: np.ndarray, axis: int, n_out: int, src_of_dst) -> np.ndarray:
    """Linear interpolation along one axis; ``src_of_dst(d)`` gives source coordinates."""
    n_in = a.shape[axis]
    s = np.clip(src_of_dst(np.arange(n_out, dtype=np.float64)), 0, n_in - 1)
    i0 = np.minimum(np.floor(s).astype(np.intp), max(n_in - 2, 0))
    w = (s - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    lo, hi = np.take(a, i0, axis=axis), np.take(a, i1, axis=axis)
    return lo + (hi - lo) * w


def _up2(a: np.ndarray, axis: int) -> np.ndarray:
    """Exact 2x linear upsampling along ``axis`` (1 or 2 of a 3D array) with slices only:
    output 2m = 0.25 a[m-1] + 0.75 a[m], output 2m+1 = 0.75 a[m] + 0.25 a[m+1], edges clamp."""
    shape = list(a.shape)
    n = shape[axis]
    shape[axis] = 2 * n
    out = np.empty(shape, dtype=a.dtype)
    q = a * a.dtype.type(0.75)
    quarter = a.dtype.type(0.25)

    def ax(sl):
        idx = [slice(None)] * 3
        idx[axis] = sl
        return tuple(idx)

    ev, od = out[ax(slice(0, None, 2))], out[ax(slice(1, None, 2))]
    np.multiply(a[ax(slice(None, -1))], quarter, out=ev[ax(slice(1, None))])
    ev[ax(slice(1, None))] += q[ax(slice(1, None))]
    ev[ax(slice(0, 1))] = a[ax(slice(0, 1))]
    np.multiply(a[ax(slice(1, None))], quarter, out=od[ax(slice(None, -1))])
    od[ax(slice(None, -1))] += q[ax(slice(None, -1))]
    od[ax(slice(-1, None))] = a[ax(slice(-1, None))]
    return out


def upsample_inplane(a: np.ndarray, f: int) -> np.ndarray:
    """Model grid -> output grid (pixel centres aligned: src = (dst + 0.5) / f - 0.5)."""
    if f == 1:
        return a
    if f == 2 and a.dtype == np.float32:
        return _up2(_up2(a, 2), 1)
    k, j, i = a.shape
    m = lambda d: (d + 0.5) / f - 0.5  # noqa: E731
    out = upsample_axis(a, 2, i * f, m)
    return upsample_axis(out, 1, j * f, m)
