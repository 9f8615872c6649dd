"""DICOM Segmentation (highdicom) of hematoma (by subtype) and lateral ventricles.

Empty findings: a segment with no voxel is left out (many viewers mishandle empty segments and
empty frames); empty frames are omitted (highdicom ``omit_empty_frames``). When every segment
is empty no SEG is written at all, and the SR says so ("no hematoma segmented").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.results import SUBTYPES, AnalysisResult, ModelInfo
from workers.report import codes

MANUFACTURER = "ichnode"
SEG_SERIES_NUMBER = 9901


@dataclass
class Segment:
    """One SEG segment: what it is, its voxels and how it is coded."""

    key: str  # subtype name, "hematoma", "ventricle_left" or "ventricle_right"
    label: str
    mask: np.ndarray  # (k, j, i) bool
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    region: hd.sr.CodedConcept | None = None
    modifier: hd.sr.CodedConcept | None = None
    number: int = 0  # 1-based segment number once numbered

    @property
    def is_hematoma(self) -> bool:
        return self.key not in ("ventricle_left", "ventricle_right")


def segments_from_masks(masks: dict[str, np.ndarray]) -> list[Segment]:
    """Non-empty segments in a fixed order (hematoma subtypes, then left, right ventricle)."""
    out: list[Segment] = []
    hem = masks.get("hematoma")
    sub = masks.get("hematoma_subtype")
    if hem is not None:
        hem = hem.astype(bool)
        if sub is not None:
            for n, name in enumerate(SUBTYPES, start=1):
                out.append(Segment(name, codes.SUBTYPE_LABEL[name], hem & (sub == n),
                                   codes.MORPHOLOGICALLY_ABNORMAL, codes.HEMORRHAGE,
                                   region=codes.SUBTYPE_SITE[name]))
            rest = hem & (sub == 0)
        else:
            rest = hem
        out.append(Segment("hematoma", "Intracranial hematoma", rest,
                           codes.MORPHOLOGICALLY_ABNORMAL, codes.HEMORRHAGE, region=codes.INTRACRANIAL))
    for key, side, word in (("ventricle_left", codes.LEFT, "Left"),
                            ("ventricle_right", codes.RIGHT, "Right")):
        if key in masks:
            out.append(Segment(key, f"{word} lateral ventricle", masks[key].astype(bool),
                               codes.ANATOMICAL_STRUCTURE, codes.LATERAL_VENTRICLE, modifier=side))
    out = [s for s in out if s.mask.any()]
    for n, s in enumerate(out, start=1):
        s.number = n
    return out


def segmentation_model(models: list[ModelInfo]) -> ModelInfo:
    """The model that produced the masks (by name), else the first, else an unknown marker."""
    for m in models:
        if "seg" in m.name.lower():
            return m
    return models[0] if models else ModelInfo(name="unknown", version="unknown", sha256="unknown")


def algorithm_sequence(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name[:64], family=codes.AI_FAMILY, version=model.version[:64], source="ichnode",
        parameters={codes.WEIGHTS_SHA256: model.sha256})


def build_seg(sources: list[Dataset], segments: list[Segment], result: AnalysisResult, *,
              sop_instance_uid: str, series_instance_uid: str) -> Dataset | None:
    """A binary SEG against ``sources`` (position-sorted), or None when there is no segment."""
    if not segments:
        return None
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for s in segments:
        if s.mask.shape != shape:
            raise ValueError(f"mask {s.key} has shape {s.mask.shape}, the series is {shape}")
    algo = algorithm_sequence(segmentation_model(result.models))
    descriptions = []
    for s in segments:
        d = hd.seg.SegmentDescription(
            segment_number=s.number, segment_label=s.label[:64],
            # Copies: highdicom keeps the given code objects, and the modifier below is per segment.
            segmented_property_category=copy.deepcopy(s.category),
            segmented_property_type=copy.deepcopy(s.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=generate_uid(entropy_srcs=[sop_instance_uid, s.key]),
            tracking_id=f"ichnode {s.key}",
            anatomic_regions=[s.region] if s.region is not None else None,
            display_color=hd.color.CIELabColor(*_lab(codes.COLOURS.get(s.key, (255, 0, 0)))),
        )
        if s.modifier is not None:
            # Laterality is a modifier of the property type (Segmented Property Type Modifier).
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [s.modifier]
        descriptions.append(d)
    pixels = np.stack([s.mask for s in segments], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid, series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="ichnode report",
        software_versions=_software_version(), device_serial_number="0",
        content_label="ICH", content_description="ichnode hematoma and ventricles",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = "ichnode SEG (AI, not verified)"
    return seg


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("ichnode")
    except Exception:  # noqa: BLE001 - not installed as a package (source checkout)
        return "0.1.0"


def _lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0-255) -> CIELab (D65), the colour space SEG display colours use."""
    c = np.array(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
            float(np.clip(lab[2], -128, 127)))
