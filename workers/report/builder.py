"""Build every result object of one study into a folder: SEG, SR, overlay series.

Pure function of (original datasets, analysis result, masks, NER entities): used by the report
step and usable from tools. UIDs are derived from ``uid_seed`` so a retried step rewrites the
same instances (PACS sees an update, not a duplicate); a new job gives new UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.results import SUBTYPES, AnalysisResult
from workers.report.overlay import build_overlay
from workers.report.seg import Segment, build_seg, segmentation_model, segments_from_masks
from workers.report.sources import slice_volumes_ml
from workers.report.sr import build_not_analysed_sr, build_sr


@dataclass
class Built:
    seg: Path | None = None
    sr: Path | None = None
    overlay: list[Path] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # number, key, label, volume_ml
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.seg, self.sr) if p is not None] + self.overlay


def _uid(seed: str, what: str) -> str:
    return generate_uid(entropy_srcs=[seed, what])


def summary_lines(result: AnalysisResult | None, reason: str | None, priority: str | None,
                  priority_reasons: list[str] | None = None) -> list[str]:
    """The text of the overlay summary slice (no patient identity)."""
    lines = ["ichnode AI triage - not verified, not a diagnosis"]
    if result is None or result.status != "ok":
        lines += ["", "NOT ANALYSED", f"Reason: {reason or (result.reason if result else None) or 'unknown'}",
                  "Read this study without AI support."]
        return lines
    any_ich = result.findings.get("any")
    if any_ich is not None:
        word = "PRESENT" if any_ich.present else "not detected"
        lines.append(f"Intracranial hemorrhage: {word} (p={any_ich.probability:.2f})")
    for label in SUBTYPES:
        f = result.findings.get(label)
        if f is not None and f.present:
            lines.append(f"  {label}: p={f.probability:.2f}")
    if result.hematoma_volume_ml is not None:
        abc2 = f" (ABC/2 {result.hematoma_abc2_ml:.1f} mL)" if result.hematoma_abc2_ml is not None else ""
        lines.append(f"Hematoma volume: {result.hematoma_volume_ml:.1f} mL{abc2}")
    if result.midline_shift_mm is not None:
        lines.append(f"Midline shift: {result.midline_shift_mm:.1f} mm")
    if result.ventricle_left_ml is not None and result.ventricle_right_ml is not None:
        lines.append(f"Lateral ventricles L/R: {result.ventricle_left_ml:.1f} / {result.ventricle_right_ml:.1f} mL")
    if priority:
        lines.append(f"Priority: {priority}")
        for r in (priority_reasons or [])[:4]:
            lines.append(f"  {r}")
    m = segmentation_model(result.models)
    lines.append(f"Model: {m.name} {m.version} ({m.sha256[:12]})")
    return lines


def build_results(sources: list[Dataset], result: AnalysisResult | None, masks: dict | None,
                  entities, out_dir: Path, *, uid_seed: str, reason: str | None = None,  # noqa: ANN001
                  priority: str | None = None, priority_reasons: list[str] | None = None) -> Built:
    """Write seg.dcm (if any segment), sr.dcm and overlay_NNN.dcm into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.dcm"):  # a re-run replaces what an earlier attempt wrote
        old.unlink()
    built = Built()
    analysed = result is not None and result.status == "ok"
    segments: list[Segment] = []
    if analysed and masks:
        shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
        if masks.get("hematoma") is not None and masks["hematoma"].shape != shape:
            built.notes.append(f"masks {masks['hematoma'].shape} do not match the series {shape}: no SEG")
        else:
            segments = segments_from_masks(masks)
    per_slice = slice_volumes_ml(sources)
    volumes = {s.key: float((s.mask.sum(axis=(1, 2)) * per_slice).sum()) for s in segments}
    built.segments = [{"number": s.number, "key": s.key, "label": s.label,
                       "volume_ml": round(volumes[s.key], 2)} for s in segments]

    if analysed:
        seg = build_seg(sources, segments, result, sop_instance_uid=_uid(uid_seed, "seg"),
                        series_instance_uid=_uid(uid_seed, "seg-series"))
        if seg is not None:
            built.seg = out_dir / "seg.dcm"
            seg.save_as(built.seg, enforce_file_format=True)
        else:
            built.notes.append("no segment with voxels: no SEG written")
        sr = build_sr(sources, result, seg=seg, segments=segments, volumes_ml=volumes,
                      entities=entities, sop_instance_uid=_uid(uid_seed, "sr"),
                      series_instance_uid=_uid(uid_seed, "sr-series"))
    else:
        why = reason or (result.reason if result is not None else None) or "unknown"
        sr = build_not_analysed_sr(sources, why, entities=entities, sop_instance_uid=_uid(uid_seed, "sr"),
                                   series_instance_uid=_uid(uid_seed, "sr-series"))
    built.sr = out_dir / "sr.dcm"
    sr.save_as(built.sr, enforce_file_format=True)

    lines = summary_lines(result, reason, priority, priority_reasons)
    overlay = build_overlay(sources, segments, lines, series_instance_uid=_uid(uid_seed, "overlay-series"),
                            uid_seed=uid_seed)
    for n, ds in enumerate(overlay, start=1):
        path = out_dir / f"overlay_{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        built.overlay.append(path)
    return built


def load_masks(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
