"""What a phantom study looks like, drawn deterministically from a seed.

:class:`PhantomSpec` holds every knob of the generator. Any field left ``None`` is drawn from the
seed by :meth:`PhantomSpec.resolved`, each group from its own named random stream, so giving one
field never changes the draws of the others (same seed, same other fields -> same study).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field

import numpy as np

SUBTYPES = ("epidural", "subdural", "subarachnoid", "intraparenchymal", "intraventricular")

# Vendor -> (manufacturer string, models, soft kernels, bone kernels), as these scanners write them.
VENDORS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "ge": ("GE MEDICAL SYSTEMS", ("Revolution CT", "Optima CT660", "LightSpeed VCT"),
           ("STANDARD", "SOFT"), ("BONE", "BONEPLUS")),
    "siemens": ("SIEMENS", ("SOMATOM Definition AS+", "SOMATOM go.Top", "Sensation 64"),
                ("H31s", "J40s", "Hr38"), ("H70h", "J70h", "Hr68")),
    "philips": ("Philips", ("Ingenuity CT", "Brilliance 64", "iCT 256"),
                ("UB", "UC"), ("D", "YD")),
    "toshiba": ("TOSHIBA", ("Aquilion ONE", "Aquilion PRIME", "Aquilion Lightning"),
                ("FC21", "FC26"), ("FC30", "FC81")),
}


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, purpose)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode())])


@dataclass
class PhantomSpec:
    """Parameters of one synthetic head CT study. ``None`` means: draw from ``seed``."""

    seed: int = 0
    subtypes: tuple[str, ...] = ()  # hemorrhage subtypes present; () = normal study
    matrix: int = 512  # 512, or 256/128 for fast training data (same field of view and anatomy)
    slice_thickness_mm: float | None = None  # 0.625-5
    slice_increment_mm: float | None = None  # table step between slices; default = thickness
    pixel_spacing_mm: float | None = None  # at matrix 512 (0.35-0.55); scaled for smaller matrices
    # Pose of the head in the scanner (degrees, mm) and gantry tilt (degrees, see docs/phantom.md).
    yaw_deg: float | None = None
    roll_deg: float | None = None
    pitch_deg: float | None = None
    offset_mm: tuple[float, float] | None = None  # head centre vs. reconstruction centre (x, y)
    tilt_deg: float | None = None
    # Acquisition and reconstruction.
    vendor: str | None = None  # key of VENDORS
    kvp: float | None = None
    ma: float | None = None
    exposure_time_ms: float | None = None
    kernel: str | None = None  # "soft" or "bone" (look of the main series)
    pixel_signed: bool | None = None  # signed int16 or unsigned 12-bit (intercept -1024 both)
    motion: bool | None = None  # motion blur on a few slices
    blank_slices: int | None = None  # empty slices above the vertex
    scan_start_mm: float | None = None  # head-frame z of the lowest slice (skull base ~ -75)
    # Subject.
    head_scale: float | None = None  # overall size factor ~0.92-1.06
    age_years: int | None = None  # older -> atrophy (wider sulci, bigger ventricles)
    sex: str | None = None  # "M" / "F"
    # Lesions.
    lesion_ml: dict[str, float] | None = None  # target volume per subtype (mL), drawn if missing
    side: str | None = None  # "left"/"right": side of the main lesion
    sdh_age: str | None = None  # "acute", "subacute" or "mixed" (chronic + dependent acute)
    language: str | None = None  # clinical history language "en" / "zh"
    extra: dict = field(default_factory=dict)  # free-form overrides for experiments

    def __post_init__(self) -> None:
        self.subtypes = tuple(dict.fromkeys(self.subtypes))
        unknown = [s for s in self.subtypes if s not in SUBTYPES]
        if unknown:
            raise ValueError(f"unknown subtype(s) {unknown}; choose from {', '.join(SUBTYPES)}")
        if self.matrix not in (64, 128, 256, 512):
            raise ValueError("matrix must be 64, 128, 256 or 512")
        if self.slice_thickness_mm is not None and not 0.5 <= self.slice_thickness_mm <= 10:
            raise ValueError("slice thickness must be 0.5-10 mm")

    @classmethod
    def random(cls, seed: int, p_normal: float = 0.3, **fixed) -> "PhantomSpec":
        """A spec with the subtypes drawn too: normal with ``p_normal``, else 1-3 subtypes with
        roughly clinical frequencies (SDH/SAH/IPH common, EDH rare)."""
        rng = rng_for(seed, "subtypes")
        if "subtypes" not in fixed:
            if rng.random() < p_normal:
                fixed["subtypes"] = ()
            else:
                weights = np.array([0.08, 0.27, 0.25, 0.25, 0.15])
                n = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
                picked = rng.choice(len(SUBTYPES), size=n, replace=False, p=weights)
                fixed["subtypes"] = tuple(SUBTYPES[i] for i in sorted(picked))
        return cls(seed=seed, **fixed)

    def resolved(self) -> "PhantomSpec":
        """A copy with every ``None`` field drawn from the seed."""
        s = dataclasses.replace(self, lesion_ml=dict(self.lesion_ml or {}), extra=dict(self.extra))
        seed = self.seed

        r = rng_for(seed, "acquisition")
        thick = float(r.choice([0.625, 1.0, 1.25, 2.5, 3.0, 5.0], p=[.1, .15, .1, .15, .1, .4]))
        spacing = float(np.round(r.uniform(0.38, 0.55), 4))
        vendor = str(r.choice(sorted(VENDORS)))
        kvp = float(r.choice([100, 120, 120, 120, 140]))
        ma = float(np.round(r.uniform(150, 420)))
        t_ms = float(r.choice([750, 1000, 1000]))
        signed = bool(r.random() < 0.4)
        s.slice_thickness_mm = (thick if s.slice_thickness_mm is None
                                else float(s.slice_thickness_mm))
        if s.slice_increment_mm is None:
            s.slice_increment_mm = s.slice_thickness_mm
        s.pixel_spacing_mm = spacing if s.pixel_spacing_mm is None else float(s.pixel_spacing_mm)
        s.vendor = vendor if s.vendor is None else s.vendor
        if s.vendor not in VENDORS:
            raise ValueError(f"unknown vendor {s.vendor!r}; choose from {', '.join(VENDORS)}")
        s.kvp = kvp if s.kvp is None else float(s.kvp)
        s.ma = ma if s.ma is None else float(s.ma)
        s.exposure_time_ms = t_ms if s.exposure_time_ms is None else float(s.exposure_time_ms)
        s.kernel = "soft" if s.kernel is None else s.kernel
        if s.kernel not in ("soft", "bone"):
            raise ValueError("kernel must be 'soft' or 'bone'")
        s.pixel_signed = signed if s.pixel_signed is None else bool(s.pixel_signed)

        r = rng_for(seed, "pose")
        yaw, roll, pitch = r.normal(0, 5), r.normal(0, 4), r.normal(4, 7)
        off = (r.normal(0, 8), r.normal(0, 6))
        tilt = 0.0 if r.random() < 0.55 else float(r.uniform(5, 22))
        motion = bool(r.random() < 0.08)
        blank = int(r.choice([0, 0, 1, 2, 3]))
        start = float(r.uniform(-95, -72))
        s.yaw_deg = float(np.clip(yaw, -15, 15)) if s.yaw_deg is None else float(s.yaw_deg)
        s.roll_deg = float(np.clip(roll, -12, 12)) if s.roll_deg is None else float(s.roll_deg)
        s.pitch_deg = float(np.clip(pitch, -15, 20)) if s.pitch_deg is None else float(s.pitch_deg)
        s.offset_mm = tuple(float(np.clip(v, -20, 20)) for v in off) if s.offset_mm is None \
            else tuple(float(v) for v in s.offset_mm)
        s.tilt_deg = tilt if s.tilt_deg is None else float(s.tilt_deg)
        s.motion = motion if s.motion is None else bool(s.motion)
        s.blank_slices = blank if s.blank_slices is None else int(s.blank_slices)
        s.scan_start_mm = start if s.scan_start_mm is None else float(s.scan_start_mm)

        r = rng_for(seed, "subject")
        scale, age, sex = r.uniform(0.93, 1.05), int(r.integers(18, 92)), str(r.choice(["M", "F"]))
        s.head_scale = float(scale) if s.head_scale is None else float(s.head_scale)
        s.age_years = age if s.age_years is None else int(s.age_years)
        s.sex = sex if s.sex is None else s.sex

        r = rng_for(seed, "lesions")
        side = str(r.choice(["left", "right"]))
        u = r.random()
        sdh_age = "acute" if u < 0.65 else ("subacute" if u < 0.85 else "mixed")
        lang = "zh" if r.random() < 0.4 else "en"
        ranges = {"epidural": (8, 60), "subdural": (10, 110), "subarachnoid": (2, 15),
                  "intraparenchymal": (3, 70), "intraventricular": (2, 20)}
        for st in SUBTYPES:  # draw all so a subtype's size does not depend on the others given
            lo, hi = ranges[st]
            v = float(np.exp(r.uniform(np.log(lo), np.log(hi))))
            if st in s.subtypes and st not in s.lesion_ml:
                s.lesion_ml[st] = round(v, 2)
        s.side = side if s.side is None else s.side
        s.sdh_age = sdh_age if s.sdh_age is None else s.sdh_age
        if s.sdh_age not in ("acute", "subacute", "mixed"):
            raise ValueError("sdh_age must be 'acute', 'subacute' or 'mixed'")
        s.language = lang if s.language is None else s.language
        return s

    def field_of_view_mm(self) -> float:
        """Reconstruction diameter (same at every matrix)."""
        return 512 * float(self.pixel_spacing_mm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["subtypes"] = list(self.subtypes)
        if d.get("offset_mm") is not None:
            d["offset_mm"] = list(d["offset_mm"])
        return d
