"""Defacing measured against ground truth (phantom face and brain masks)."""

from __future__ import annotations

import numpy as np

from models.volume import Volume
from workers.deid.deface import DefaceResult


def score(original: Volume, result: DefaceResult, face: np.ndarray, brain: np.ndarray,
          ears: np.ndarray | None = None) -> dict:
    """Share of face voxels destroyed (replaced), and brain voxels changed (must be 0).

    "Destroyed" counts voxels whose value was replaced by one that does not depend on it (air,
    random values or the constant wall bone); "changed" compares values, so a face voxel that
    happened to be replaced by its own value still counts as destroyed but not as changed.
    """
    face = face.astype(bool)
    brain = brain.astype(bool)
    changed = result.volume.hu != original.hu
    n_face = int(face.sum())
    # Soft tissue of the face: what a surface rendering shows (skin, nose, lips, eyelids).
    soft = face & (original.hu > -200) & (original.hu < 300)
    out = {
        "face_voxels": n_face,
        "face_destroyed": float((face & result.replaced).sum()) / max(n_face, 1),
        "face_soft_destroyed": float((soft & result.replaced).sum()) / max(int(soft.sum()), 1),
        "face_changed": float((face & changed).sum()) / max(n_face, 1),
        "brain_voxels": int(brain.sum()),
        "brain_changed": int((brain & changed).sum()),
        "seconds": float(result.seconds),
    }
    if ears is not None:
        ears = ears.astype(bool)
        out["ears_destroyed"] = float((ears & result.replaced).sum()) / max(int(ears.sum()), 1)
    return out
