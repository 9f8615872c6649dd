"""Acquisition physics on the painted model grid: streaks, motion, kernel look and noise.

Quantum noise follows the usual scaling, sigma ~ 1/sqrt(mAs * thickness) and falls with kVp;
it is generated on the model grid and upsampled with the image, which gives it the 2-3 pixel
grain of a soft-tissue kernel at 512. A bone kernel sharpens edges and adds fine-grained noise.
Beam hardening / photon starvation appears as dark bands and radial streaks between the dense
petrous bones; slices through the skull base are also noisier.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.phantom.fields import F32, Canvas
from models.phantom.geometry import upsample_inplane
from models.phantom.spec import PhantomSpec, rng_for

HU_MIN, HU_MAX = -1024, 3071
SOFT_EDGE_HU = (-150.0, 150.0)  # range a soft kernel's edge enhancement acts on


def noise_sigma(spec: PhantomSpec, pixel_mm: float) -> float:
    """Brain noise SD (HU) of a soft-kernel image with these technique factors."""
    # Quantum noise ~ 1/sqrt(mAs); thin slices are noisier, though less than 1/sqrt(T) because
    # scanners reconstruct them with iterative methods (typical: ~3-4 HU at 5 mm, 7-9 HU at
    # 0.625 mm for a 250 mAs head protocol).
    mas = spec.ma * spec.exposure_time_ms / 1000.0
    sigma = 3.3 * np.sqrt(250.0 / mas) * (5.0 / spec.slice_thickness_mm) ** 0.4
    sigma *= (120.0 / spec.kvp) ** 1.2
    return float(min(sigma * (0.45 / pixel_mm) ** 0.8, 14.0))


def add_streaks(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dark bands and radial streaks on slices through both petrous ridges (beam hardening,
    photon starvation); returns a per-slice dense-bone score used to raise noise there."""
    pet = c.labels.get("_petrous")
    k = c.hu.shape[0]
    score = np.zeros(k, F32)
    if pet is None:
        return score
    px = c.geom.model_pixel
    area = (pet > 0.5).sum(axis=(1, 2)) * px * px
    score[:] = np.clip(area / 400.0, 0, 3)
    nj, ni = c.shape[1:]
    jj = ii = None
    for kk in np.flatnonzero(area > 120.0):
        dense = pet[kk] > 0.5
        lab, nlab = ndimage.label(dense)
        if nlab < 1:
            continue
        if jj is None:
            jj, ii = np.mgrid[0:nj, 0:ni].astype(F32)
        sizes = ndimage.sum_labels(dense, lab, np.arange(1, nlab + 1))
        big = np.argsort(sizes)[::-1][:2] + 1
        cents = ndimage.center_of_mass(dense, lab, big)
        amp = F32(min(35.0, 6.0 + 0.03 * float(area[kk])))
        hu = c.hu[kk]
        inside = (hu > -300) & (hu < 1000)
        add = np.zeros((nj, ni), F32)
        if len(cents) == 2:  # Hounsfield bar between the two petrous bones
            (j1, i1), (j2, i2) = cents
            dj, di = j2 - j1, i2 - i1
            L2 = max(dj * dj + di * di, 1.0)
            t = np.clip(((jj - j1) * dj + (ii - i1) * di) / L2, 0, 1)
            d = np.hypot(jj - (j1 + t * dj), ii - (i1 + t * di)) * px
            add -= amp * np.exp(-(d / 5.0) ** 2)
        for (cj, ci) in cents:  # radial streaks: alternating bright/dark with angle
            phi = np.arctan2(jj - cj, ii - ci)
            r = np.hypot(jj - cj, ii - ci) * px
            m = np.arange(8, 20)
            ph = rng.uniform(0, 2 * np.pi, m.size)
            w = rng.normal(0, 1, m.size)
            ang = np.zeros_like(phi)
            for mm, pp, ww in zip(m, ph, w):
                ang += F32(ww) * np.cos(mm * phi + pp)
            ang *= F32(1.0 / np.sqrt((w * w).sum()))
            add += ang * np.exp(-r / 30.0) * amp * F32(0.35)
        hu += add * inside
    return score


def add_motion(c: Canvas, rng: np.random.Generator) -> list[int]:
    """Blur and double contours on a few consecutive slices (head moved during rotation).

    The label fractions move with the image (generator version 3): a voxel the blur filled
    with skull is no longer called brain, so the ground truth stays true on these slices."""
    k = c.hu.shape[0]
    n = int(rng.integers(1, max(2, k // 6)))
    k0 = int(rng.integers(0, max(1, k - n)))
    ang = rng.uniform(0, 2 * np.pi)
    mag = rng.uniform(2.0, 6.0) / c.geom.model_pixel
    shift = (mag * np.sin(ang), mag * np.cos(ang))
    out = []
    for kk in range(k0, min(k, k0 + n)):
        c.hu[kk] = _moved(c.hu[kk], shift)
        for frac in c.labels.values():
            if frac[kk].any():
                frac[kk] = _moved(frac[kk], shift)
        out.append(kk)
    return out


def _moved(sl: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """One slice as the moving head left it: the mean over the path plus the end position.
    Linear, so HU and label fractions go through the same operator."""
    acc = np.zeros_like(sl)
    steps = np.linspace(0, 1, 5)
    for s in steps:
        acc += ndimage.shift(sl, (s * shift[0], s * shift[1]), order=1, mode="nearest")
    return 0.6 * acc / len(steps) + 0.4 * ndimage.shift(sl, shift, order=1, mode="nearest")


def _central_gain(c: Canvas) -> np.ndarray:
    """Noise is higher in the middle of the head (longest paths through it): a 2D gain map
    (same for every slice) peaking at the head centre."""
    g = c.geom
    inv = np.linalg.inv(g.model_affine)
    ci, cj = (inv @ np.append(g.centre, 1.0))[:2]
    nj, ni = c.shape[1:]
    jj, ii = np.ogrid[0:nj, 0:ni]
    r2 = ((ii - ci) ** 2 + (jj - cj) ** 2) * g.model_pixel ** 2
    gain = 0.85 + 0.4 * np.exp(-r2 / (2 * 55.0 ** 2))
    return gain.astype(F32)[None]


def finish(c: Canvas, spec: PhantomSpec, kernel: str | None = None,
           salt: str = "") -> np.ndarray:
    """Model-grid HU (with artefacts already painted) -> output int16 HU with noise."""
    kernel = kernel or spec.kernel
    g = c.geom
    rng = rng_for(spec.seed, "noise" + salt)
    f = g.factor
    sigma = noise_sigma(spec, g.pixel)
    img = c.hu
    if kernel == "bone":
        blur = ndimage.gaussian_filter(img, (0, 1.0, 1.0))
        img = img + 1.2 * (img - blur)
        sigma *= 3.5
    else:  # soft kernels differ in sharpness between vendors/sites (H31s vs J40s vs FC26...)
        amount = float(rng_for(spec.seed, "kernel-sharpness").uniform(-0.3, 0.5))
        if abs(amount) > 0.05:
            # Sharpen the soft-tissue range only. A linear unsharp mask across the ~1800 HU step
            # of the inner table rang 100-250 HU below air-free brain in the first millimetres
            # (where thin subdural blood lies); brain kernels with bone-edge correction / iterative
            # reconstruction keep that rim within a few tens of HU.
            soft = np.clip(img, SOFT_EDGE_HU[0], SOFT_EDGE_HU[1])
            blur = ndimage.gaussian_filter(soft, (0, 0.8, 0.8))
            img = img + F32(amount) * (soft - blur)
    # upsampling by f scales white noise SD by ~(0.75^2 + 0.25^2) per axis (f = 2)
    gain = {1: 1.0, 2: 0.625, 4: 0.52}[f]
    score = getattr(c, "bone_score", np.zeros(img.shape[0], F32))
    per_slice = F32(sigma / gain) * (1 + np.clip(score, 0, 3)[:, None, None] * F32(0.25))
    noise = rng.standard_normal(img.shape, dtype=F32)
    if f == 1:  # same grain at 128/256 as the upsampled 512 image
        noise = ndimage.gaussian_filter(noise, (0, 0.5, 0.5)) * F32(1.6)
    img = img + noise * per_slice * _central_gain(c)
    out = upsample_inplane(img, f)
    if kernel == "bone" and f > 1:
        out += rng.standard_normal(out.shape, dtype=F32) * F32(sigma * 0.5)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    return np.rint(out).astype(np.int16)
