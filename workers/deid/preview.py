"""Before/after renderings of defacing that a person can judge at a glance.

A shaded skin-surface view (first voxel above -300 HU along each ray) from the front and from the
patient's left, in the head's own frame (anterior found as in :mod:`workers.deid.deface`, so a
turned head is still seen face-on), for the original and the defaced volume side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from models.volume import Volume
from workers.deid.deface import ANTERIOR, SUPERIOR, DefaceError, head_frame, largest_component

SKIN_HU = -300.0


def _frame(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    try:
        return head_frame(volume)
    except DefaceError:  # no skull found: look along the patient axes from the volume centre
        shape = np.array(volume.hu.shape[::-1], dtype=float)
        centre = (volume.affine @ np.append((shape - 1) / 2, 1.0))[:3]
        return centre, ANTERIOR.copy()


def render_surface(volume: Volume, centre: np.ndarray, anterior: np.ndarray, view: str, *,
                   half_mm: float = 130.0, step_mm: float = 1.5) -> np.ndarray:
    """A shaded surface image (uint8, rows = superior to inferior) viewed from ``view``.

    ``view`` is "front" (rays go posterior) or "left" (rays from the patient's left).
    """
    left = np.cross(SUPERIOR, anterior)
    if view == "front":
        # The viewer faces the patient: the patient's right is on the image's left.
        depth_dir, col_dir = -anterior, left
    elif view == "left":
        depth_dir, col_dir = -left, -anterior  # face on the image's left
    else:
        raise ValueError(f"unknown view {view!r}")
    n = int(2 * half_mm / step_mm)
    ax = (np.arange(n) - (n - 1) / 2) * step_mm
    t, r, c = np.meshgrid(ax, -ax, ax, indexing="ij")  # depth, row (superior up), column
    pts = (centre[:, None] + np.outer(depth_dir, t.ravel()) + np.outer(SUPERIOR, r.ravel())
           + np.outer(col_dir, c.ravel()))
    ijk = np.linalg.inv(volume.affine) @ np.vstack([pts, np.ones(pts.shape[1])])
    samples = ndimage.map_coordinates(volume.hu.astype(np.float32, copy=False),
                                      ijk[[2, 1, 0]], order=1, cval=-1024.0)
    solid = samples.reshape(t.shape) > SKIN_HU
    solid = largest_component(solid)  # the head only: no table, headrest or blanket
    hit = solid.any(axis=0)
    depth = np.where(hit, solid.argmax(axis=0), n).astype(np.float32)
    gy, gx = np.gradient(ndimage.gaussian_filter(depth, 1.0))
    lambert = 1.0 / np.sqrt(1.0 + gx ** 2 + gy ** 2)
    shade = lambert * (1.0 - 0.6 * depth / n)
    return np.where(hit, 40 + 215 * np.clip(shade, 0, 1), 0).astype(np.uint8)




def write_preview(before: Volume, after: Volume, out: Path, *, title: str = "") -> Path:
    """PNG: rows = before / after, columns = front / left surface views."""
    centre, anterior = _frame(before)
    tiles = [[np.kron(render_surface(v, centre, anterior, view), np.ones((2, 2), np.uint8))
              for view in ("front", "left")] for v in (before, after)]  # 2x: easier to judge
    h, w = tiles[0][0].shape
    pad, label_h = 6, 18
    canvas = Image.new("L", (2 * w + 3 * pad, 2 * (h + label_h) + 3 * pad + label_h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title or "defacing preview", fill=255)
    for row, name in enumerate(("before", "after")):
        for col, view in enumerate(("front", "left")):
            x = pad + col * (w + pad)
            y = label_h + pad + row * (h + label_h + pad)
            draw.text((x, y), f"{name} - {view}", fill=255)
            canvas.paste(Image.fromarray(tiles[row][col]), (x, y + label_h))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
