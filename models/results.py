"""What the gpu step returns: the contract between the model workers and the report step.

The masks themselves travel as ``masks.npz`` in the work-item folder (never through the broker),
on the work item's voxel grid (same (k, j, i) order and affine as its :class:`~models.volume.Volume`),
with boolean arrays ``hematoma``, ``ventricle_left``, ``ventricle_right`` and an optional uint8
``hematoma_subtype`` (0 none, else 1 + index in :data:`SUBTYPES`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

SUBTYPES = ("epidural", "subdural", "subarachnoid", "intraparenchymal", "intraventricular")
LABELS = SUBTYPES + ("any",)
MASK_NAMES = ("hematoma", "ventricle_left", "ventricle_right")


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str  # checksum of the weights file that produced the result


class SubtypeResult(BaseModel):
    probability: float = Field(ge=0, le=1)  # calibrated study-level probability
    present: bool  # probability >= the model's operating threshold (a subtype: and "any" present)
    threshold: float
    slice_probabilities: list[float] = Field(default_factory=list)  # per slice, k order


class AnalysisResult(BaseModel):
    status: Literal["ok", "not_analysed"] = "ok"
    reason: str | None = None  # why not analysed
    models: list[ModelInfo] = Field(default_factory=list)
    findings: dict[str, SubtypeResult] = Field(default_factory=dict)  # keys from LABELS
    # Which of the triage bundle's calibrations gave the probabilities and thresholds
    # ("default" or a pixel-spacing band).
    operating_point: str | None = None
    hematoma_volume_ml: float | None = None
    hematoma_abc2_ml: float | None = None
    midline_shift_mm: float | None = None
    ventricle_left_ml: float | None = None
    ventricle_right_ml: float | None = None
    max_hematoma_slice: int | None = None  # k index of the largest hematoma area
    masks_file: str | None = None  # relative to the work-item folder
    seconds: dict[str, float] = Field(default_factory=dict)
