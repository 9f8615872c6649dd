"""Series selection for head CT: which series of a complete study is analysed, and why.

Works only on the attributes copied at intake into ``Instance.meta`` (DICOM keywords, see
``node.spool.META_KEYWORDS``) plus the SOP Class UID column, never re-reads files. Every
series gets a decision with a reason; the whole log is kept in ``Study.selection_log`` so an admin can see why a study was skipped or why
one reconstruction was preferred over another.

Rules, in order (the first that fails rejects the series):
Modality CT -> single-frame CT images -> not all LOCALIZER -> ORIGINAL (not DERIVED/reformat) ->
head/brain evidence (BodyPartExamined, series/study description, protocol) -> one orientation ->
axial (slice normal within 35 degrees of the head-feet axis, gantry tilt allowed) -> one in-plane
geometry -> >= ``min_slices`` distinct positions -> no duplicate positions -> even spacing (no
missing slices) -> slice thickness <= ``max_slice_thickness_mm``.
Among usable series: soft-tissue kernel before unknown kernel before bone kernel, then the
thinnest reconstruction, then the most slices, then the lowest series number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

MAX_AXIAL_ANGLE_DEG = 35.0  # gantry tilt of head CT stays well below this
SPACING_TOLERANCE = 0.2  # relative deviation from the median slice gap still counted as even
ORIENTATION_TOLERANCE = 1e-3

_HEAD_WORDS = re.compile(
    r"head|brain|skull|cran|cerebr|neuro|kopf|sch[aä]del|hirn|cabeza|cr[aâ]ne|cerveau|t[eê]te|"
    r"\bncct\b|\bnch\b|stroke|ich\b", re.IGNORECASE)
_HEAD_BODY_PARTS = {"HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK", "HEADANDNECK", "CRANIUM",
                    "CEREBRUM", "IAC", "SELLA", "ORBIT"}
# Kernels: vendor names seen on head CT. Generic Siemens-style names (letters + two digits,
# e.g. H31s, J40s, Hr38, Br64) are soft below 50 and sharp/bone from 50 up.
# Canon/Toshiba FCnn: brain kernels FC1x-FC2x, bone/lung FC3x and up.
_BONE_KERNELS = re.compile(r"bone|lung|edge|sharp|detail|ultra|\bd\b|\bya\b|\byb\b|\byc\b|"
                           r"\bl\b", re.IGNORECASE)
_SOFT_KERNELS = re.compile(r"standard|soft|brain|smooth|\bua\b|\bub\b|\buc\b|\bec\b|\bc\b",
                           re.IGNORECASE)
_TOSHIBA_KERNEL = re.compile(r"^FC(\d{2})", re.IGNORECASE)
_SIEMENS_KERNEL = re.compile(r"^[A-Za-z]{1,2}(\d{2})[a-z]?\b")
KERNEL_RANK = {"soft": 0, "unknown": 1, "bone": 2}


@dataclass
class SeriesInput:
    """One series as selection sees it: index columns plus each instance's meta."""

    series_uid: str
    metas: list[dict]
    modality: str | None = None
    description: str | None = None
    body_part: str | None = None


@dataclass
class SeriesDecision:
    series_uid: str
    usable: bool
    reason: str
    series_number: int | None = None
    description: str | None = None
    slices: int = 0
    thickness_mm: float | None = None
    spacing_mm: float | None = None
    kernel: str | None = None
    kernel_class: str = "unknown"
    selected: bool = False

    def as_dict(self) -> dict:
        return {
            "series_uid": self.series_uid, "series_number": self.series_number,
            "description": self.description, "decision": "selected" if self.selected else (
                "usable" if self.usable else "rejected"),
            "reason": self.reason, "slices": self.slices, "thickness_mm": self.thickness_mm,
            "spacing_mm": self.spacing_mm, "kernel": self.kernel, "kernel_class": self.kernel_class,
        }


@dataclass
class Selection:
    selected_series_uid: str | None
    reason: str
    decisions: list[SeriesDecision] = field(default_factory=list)

    @property
    def key(self) -> str:
        """What a job's input depends on: a changed key means a new job (see node.assembly)."""
        if self.selected_series_uid is None:
            return f"skipped:{self.reason}"
        chosen = next(d for d in self.decisions if d.selected)
        return f"series:{self.selected_series_uid}:{chosen.slices}"

    def as_log(self) -> dict:
        return {"selected_series_uid": self.selected_series_uid, "reason": self.reason,
                "key": self.key, "series": [d.as_dict() for d in self.decisions]}


class _Reject(Exception):
    pass


def _first(metas: Sequence[dict], key: str) -> Any:
    for m in metas:
        if m.get(key) not in (None, "", []):
            return m[key]
    return None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return list(value)


def is_localizer(meta: dict) -> bool:
    return any(str(v).upper() == "LOCALIZER" for v in _as_list(meta.get("ImageType")))


def image_instances(metas: Iterable[dict]) -> list[dict]:
    """The instances of a series that can be slices: drops localizers (scouts)."""
    return [m for m in metas if not is_localizer(m)]


def kernel_class(kernel: str | None, description: str | None = None) -> str:
    """'soft', 'bone' or 'unknown' from ConvolutionKernel (and the series description)."""
    text = " ".join(_as_list(kernel)) if kernel else ""
    m = _TOSHIBA_KERNEL.match(text.strip())
    if m:
        return "bone" if int(m.group(1)) >= 30 else "soft"
    m = _SIEMENS_KERNEL.match(text.strip())
    if m:
        return "bone" if int(m.group(1)) >= 50 else "soft"
    if text and _BONE_KERNELS.search(text):
        return "bone"
    if text and _SOFT_KERNELS.search(text):
        return "soft"
    if description and re.search(r"bone|knochen|os\b", description, re.IGNORECASE):
        return "bone"
    if description and re.search(r"brain|soft|weich|hirn", description, re.IGNORECASE):
        return "soft"
    return "unknown"


def _head_evidence(series: SeriesInput, metas: Sequence[dict]) -> str:
    body = (series.body_part or _first(metas, "BodyPartExamined") or "").strip().upper()
    if body:
        if body.replace(" ", "") in _HEAD_BODY_PARTS or "HEAD" in body or "BRAIN" in body:
            return f"BodyPartExamined {body}"
        raise _Reject(f"BodyPartExamined {body} is not head/brain")
    for key in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        text = series.description if key == "SeriesDescription" and series.description else \
            _first(metas, key)
        if text and _HEAD_WORDS.search(str(text)):
            return f"{key} mentions head/brain"
    raise _Reject("no head/brain indication in BodyPartExamined, descriptions or protocol")


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def _geometry(metas: Sequence[dict], settings_min_slices: int) -> tuple[int, float, np.ndarray]:
    """Checks orientation/positions/spacing; returns (slices, median gap mm, normal)."""
    iops = [m.get("ImageOrientationPatient") for m in metas]
    if any(i is None or len(i) != 6 for i in iops):
        raise _Reject("ImageOrientationPatient missing on some images")
    arr = np.asarray(iops, float)
    if np.abs(arr - arr[0]).max() > ORIENTATION_TOLERANCE:
        raise _Reject("images have different orientations")
    normal = _normal(arr[0])
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > MAX_AXIAL_ANGLE_DEG:
        plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
        raise _Reject(f"not axial ({plane}-like, slice normal {angle:.0f} deg from head-feet axis)")
    shapes = {(m.get("Rows"), m.get("Columns"), tuple(_as_list(m.get("PixelSpacing"))))
              for m in metas}
    if len(shapes) > 1:
        raise _Reject("images have different sizes or pixel spacings")
    ipps = [m.get("ImagePositionPatient") for m in metas]
    if any(p is None or len(p) != 3 for p in ipps):
        raise _Reject("ImagePositionPatient missing on some images")
    pos = np.sort(np.asarray(ipps, float) @ normal)
    distinct = np.unique(np.round(pos, 3))
    if len(distinct) < settings_min_slices:
        raise _Reject(f"only {len(distinct)} slice positions (fewer than {settings_min_slices})")
    if len(distinct) != len(pos):
        raise _Reject(f"{len(pos) - len(distinct)} duplicate slice positions "
                      "(several acquisitions in one series)")
    gaps = np.diff(pos)
    gap = float(np.median(gaps))
    if gap <= 0 or np.abs(gaps - gap).max() > max(SPACING_TOLERANCE * gap, 0.05):
        worst = float(gaps[np.argmax(np.abs(gaps - gap))])
        raise _Reject(f"uneven slice spacing (median {gap:.2f} mm, one gap {worst:.2f} mm: "
                      "missing slices or variable spacing)")
    return len(pos), gap, normal


def decide_series(series: SeriesInput, *, min_slices: int,
                  max_thickness_mm: float) -> SeriesDecision:
    """One series' decision with its reason (usable or rejected)."""
    metas = series.metas
    number = _first(metas, "SeriesNumber")
    desc = series.description or _first(metas, "SeriesDescription")
    d = SeriesDecision(series.series_uid, False, "", series_number=int(number) if number is not None
                       else None, description=desc, slices=len(metas))
    try:
        modality = (series.modality or _first(metas, "Modality") or "").upper()
        if modality != "CT":
            raise _Reject(f"modality {modality or 'unknown'}, not CT")
        classes = {m.get("SOPClassUID") for m in metas} - {None}
        frames = max(int(m.get("NumberOfFrames") or 1) for m in metas)
        if ENHANCED_CT_STORAGE in classes or frames > 1:
            raise _Reject("multi-frame (Enhanced) CT is not supported")
        if classes and classes != {CT_IMAGE_STORAGE}:
            raise _Reject("not CT Image Storage (SOP class " + ", ".join(sorted(classes)) + ")")
        images = image_instances(metas)
        if not images:
            raise _Reject("localizer (scout) images only")
        kinds = {(_as_list(m.get("ImageType")) or ["?"])[0].upper() for m in images}
        if kinds != {"ORIGINAL"}:
            raise _Reject("not ORIGINAL images (ImageType " + "/".join(sorted(kinds)) + ")")
        evidence = _head_evidence(series, images)
        d.kernel = " ".join(_as_list(_first(images, "ConvolutionKernel"))) or None
        d.kernel_class = kernel_class(d.kernel, desc)
        d.slices, d.spacing_mm, _ = _geometry(images, min_slices)
        thickness = _first(images, "SliceThickness")
        d.thickness_mm = float(thickness) if thickness is not None else d.spacing_mm
        if d.thickness_mm > max_thickness_mm + 1e-6:
            raise _Reject(f"slices {d.thickness_mm:g} mm thick (more than {max_thickness_mm:g} mm)")
        d.usable = True
        d.reason = (f"usable: {evidence}, axial, {d.slices} slices at {d.spacing_mm:.2f} mm, "
                    f"{d.thickness_mm:g} mm thick, {d.kernel_class} kernel ({d.kernel or 'none'})")
    except _Reject as exc:
        d.reason = str(exc)
    return d


def _rank(d: SeriesDecision) -> tuple:
    return (KERNEL_RANK[d.kernel_class], d.thickness_mm or 99.0, -d.slices,
            d.series_number if d.series_number is not None else 1 << 30)


def select_series(series: Iterable[SeriesInput], *, min_slices: int,
                  max_thickness_mm: float) -> Selection:
    """Decide every series, pick the best usable one, explain the choice."""
    decisions = [decide_series(s, min_slices=min_slices, max_thickness_mm=max_thickness_mm)
                 for s in series]
    usable = sorted((d for d in decisions if d.usable), key=_rank)
    if not usable:
        if not decisions:
            return Selection(None, "no series received", decisions)
        return Selection(None, "no usable head CT series: " + "; ".join(
            f"{_label(d)}: {d.reason}" for d in decisions), decisions)
    best = usable[0]
    best.selected = True
    best.reason = "selected: " + best.reason.removeprefix("usable: ")
    for other in usable[1:]:
        other.reason = f"not chosen ({_why_not(other, best)}); " + other.reason
    return Selection(best.series_uid, f"{_label(best)}: {best.kernel_class} kernel, "
                     f"{best.thickness_mm:g} mm, {best.slices} slices", decisions)


def _label(d: SeriesDecision) -> str:
    # SeriesNumber is optional in Instance.meta; the description is the admin's next best name.
    if d.series_number is not None:
        return f"series {d.series_number}"
    return f"series '{d.description}'" if d.description else "series (unnamed)"


def _why_not(other: SeriesDecision, best: SeriesDecision) -> str:
    if KERNEL_RANK[other.kernel_class] > KERNEL_RANK[best.kernel_class]:
        return f"{other.kernel_class} kernel; {best.kernel_class} kernel preferred"
    if (other.thickness_mm or 99) > (best.thickness_mm or 99):
        return f"thicker than {best.thickness_mm:g} mm"
    if other.slices < best.slices:
        return "fewer slices"
    return "higher series number"
