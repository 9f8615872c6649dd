"""A CT volume with its geometry: the one in-memory form every step passes around.

Voxel order is (slice, row, column) = (k, j, i). ``affine`` maps (i, j, k, 1) (column, row,
slice) to DICOM patient coordinates (LPS, mm), so masks computed on ``hu`` can be written
back against the original instances (SEG) without resampling. Slices are sorted by position
along the slice normal (never by Instance Number).

Loading a DICOM series lives in :mod:`models.preprocess.series` (``load_series``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    hu: np.ndarray  # (k, j, i) float32 or int16, Hounsfield units
    affine: np.ndarray  # 4x4, (i, j, k, 1) -> LPS mm
    # Per-slice source references (PHI zone only; pseudonymised in a work item).
    sop_instance_uids: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # technical, PHI-free attributes (kernel, kVp, tilt...)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm, from the affine."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)  # i, j, k column norms
        return float(cols[2]), float(cols[1]), float(cols[0])

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def save(self, path: Path) -> None:
        """Write as .npz (no PHI is written: only voxels, affine and technical meta)."""
        import json

        np.savez_compressed(path, hu=self.hu, affine=self.affine,
                            meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: Path) -> "Volume":
        import json

        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode()) if "meta" in data else {}
            return cls(hu=data["hu"], affine=data["affine"], meta=meta)
