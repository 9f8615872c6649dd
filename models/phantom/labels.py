"""Ground truth files next to a series: masks (NPZ or NIfTI) and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.phantom.generate import MASK_NAMES
from models.phantom.history import clinical_note
from models.phantom.spec import SUBTYPES


def subtype_map(study) -> np.ndarray:
    """uint8 (k, j, i): 0 none, else 1 + index in SUBTYPES (as models.results documents);
    where bleeds overlap the later subtype in SUBTYPES wins."""
    out = np.zeros(study.volume.hu.shape, np.uint8)
    for n, st in enumerate(SUBTYPES):
        if st in study.spec.subtypes:
            out[study.masks[st]] = n + 1
    return out


def write_labels(study, out_dir, *, fmt: str = "npz") -> dict[str, Path]:
    """Write ``masks.npz`` (bool arrays by name, ``hematoma_subtype``, ``affine``) or one
    ``<name>.nii.gz`` per mask (fmt="nifti", RAS affine as NIfTI expects), and
    ``truth.json``. Masks are on the series' voxel grid (k, j, i), affine -> LPS mm."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    masks = {name: study.masks[name] for name in MASK_NAMES}
    if fmt == "npz":
        p = out / "masks.npz"
        np.savez_compressed(p, affine=study.volume.affine, hematoma_subtype=subtype_map(study),
                            **masks)
        paths["masks"] = p
    elif fmt == "nifti":
        import nibabel as nib

        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        aff = lps_to_ras @ study.volume.affine
        for name, m in masks.items():
            p = out / f"{name}.nii.gz"
            # NIfTI voxel order is (i, j, k)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(m.transpose(2, 1, 0)).astype(np.uint8),
                                     aff), p)
            paths[name] = p
    else:
        raise ValueError("fmt must be 'npz' or 'nifti'")
    summary = dict(study.truth)
    summary["clinical_note"] = clinical_note(study.spec)
    summary["affine"] = study.volume.affine.tolist()
    summary["shape"] = list(study.volume.hu.shape)
    summary["mask_files"] = {k: v.name for k, v in paths.items()}
    p = out / "truth.json"
    p.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=_json_default))
    paths["truth"] = p
    return paths


def _json_default(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))
