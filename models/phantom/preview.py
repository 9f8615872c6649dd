"""A PNG contact sheet of a phantom study that a person can look at.

Each row is one slice (slices through the lesions first, then evenly spread); columns show the
brain window (L40/W80), the subdural window (L80/W200) with label contours, and the bone window
(L600/W2800). Contours: red hematoma, yellow ventricles, cyan midline, green brain, magenta face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

WINDOWS = {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)}
CONTOURS = (("brain", (0, 160, 0)), ("face", (200, 0, 200)), ("ventricle_left", (255, 220, 0)),
            ("ventricle_right", (255, 140, 0)), ("midline", (0, 220, 255)),
            ("hematoma", (255, 30, 30)))


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return (np.clip((hu.astype(np.float32) - lo) / width, 0, 1) * 255).astype(np.uint8)


def pick_slices(study, n: int = 6) -> list[int]:
    k = study.volume.hu.shape[0]
    hem = study.masks["hematoma"]
    area = hem.sum(axis=(1, 2))
    chosen: list[int] = []
    if area.any():
        ks = np.flatnonzero(area)
        for q in (0.5, 0.15, 0.85):
            chosen.append(int(ks[int(q * (len(ks) - 1))]))
        chosen.append(int(np.argmax(area)))
    brain = study.masks["brain"].sum(axis=(1, 2))
    bk = np.flatnonzero(brain > 0.05 * brain.max())
    if bk.size:
        for q in np.linspace(0.05, 0.95, n):
            chosen.append(int(bk[int(q * (len(bk) - 1))]))
    out = []
    for kk in chosen:
        if kk not in out and 0 <= kk < k:
            out.append(kk)
    return sorted(out[:n])


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def render_slice(study, k: int, tile: int = 320) -> Image.Image:
    hu = study.volume.hu[k]
    tiles = []
    for name, (lv, wd) in WINDOWS.items():
        g = window(hu, lv, wd)
        rgb = np.stack([g, g, g], axis=-1)
        if name == "subdural":
            for mname, colour in CONTOURS:
                m = study.masks[mname][k]
                if m.any():
                    rgb[_outline(m)] = colour
        im = Image.fromarray(rgb).resize((tile, tile), Image.Resampling.LANCZOS
                                         if name != "subdural" else Image.Resampling.NEAREST)
        tiles.append(im)
    row = Image.new("RGB", (tile * len(tiles), tile))
    for n, im in enumerate(tiles):
        row.paste(im, (n * tile, 0))
    labels = [st[:3].upper() for st, v in study.truth["slice_labels"].items()
              if st != "any" and v[k]]
    ImageDraw.Draw(row).text((4, 4), f"k={k} {' '.join(labels)}", fill=(255, 255, 0))
    return row


def write_preview(study, path: Path, n: int = 6, tile: int = 320) -> Path:
    ks = pick_slices(study, n)
    rows = [render_slice(study, k, tile) for k in ks]
    head = Image.new("RGB", (rows[0].width, 22))
    t = study.truth
    text = (f"seed {study.seed}  {','.join(study.spec.subtypes) or 'normal'}  "
            f"hem {t['hematoma_volume_ml']:.1f} mL  shift {t['midline_shift_mm']:.1f} mm  "
            f"{study.spec.slice_thickness_mm} mm  tilt {study.spec.tilt_deg:.0f}  "
            f"{study.volume.meta['kernel']}")
    ImageDraw.Draw(head).text((4, 4), text, fill=(255, 255, 255))
    sheet = Image.new("RGB", (rows[0].width, head.height + sum(r.height for r in rows)))
    sheet.paste(head, (0, 0))
    y = head.height
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path
