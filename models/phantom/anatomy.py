"""The head: analytic anatomy in the head frame, painted onto the model grid.

Head frame (mm, before ``head_scale``): x to the patient's left, y posterior, z superior; the
origin is near the centre of the cranial cavity (level of the lateral ventricles' bodies).
Sizes are those of an average adult (cavity ~136 x 172 x 130 mm, ~1.4 L).

Painting order (later paints over earlier): soft-tissue envelope with scalp fat, face and skull
base (bones, sinuses, orbits, mandible, spine), skull with tables, diploe and sutures, cranial
contents (CSF, brain grey/white matter with sulci, deep grey nuclei, ventricles, cisterns,
falx, tentorium, calcifications), headrest. Lesions are painted afterwards by
:mod:`models.phantom.lesions`. Every primitive is evaluated only inside its own index box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.phantom.fields import F32, Canvas, Noise, capsule, ellipsoid, smin, smoothstep
from models.phantom.spec import PhantomSpec, rng_for

CAVITY_C = (0.0, 5.0, -8.0)
CAVITY_R = (68.0, 86.0, 72.0)
POST_C = (0.0, 40.0, -50.0)  # posterior fossa bowl (cerebellum)
POST_R = (54.0, 44.0, 30.0)
CANAL = ((0.0, 30.0, -70.0), (0.0, 26.0, -175.0), 10.5)
SEPTUM = (0.0, -15.0, 18.0)  # septum pellucidum level where midline shift is measured


@dataclass
class Subject:
    """Per-study anatomical variety drawn from the seed."""

    atrophy: float
    skull_t: float
    scalp_fat: float
    gm: float
    wm: float
    csf: float
    bone_cortex: float
    diploe: float
    vent_scale: float
    sulcus_w: float
    csf_w: float
    asym: float  # small left/right ventricle asymmetry
    pineal_calc: bool
    choroid_calc: bool
    falx_calc: bool
    bg_calc: bool
    suture_open: float  # 1 young (visible sutures) .. 0 fused
    sinus_fluid: float  # mucosal thickening / fluid in the maxillary sinuses (0-1)


def draw_subject(spec: PhantomSpec) -> Subject:
    r = rng_for(spec.seed, "anatomy")
    age = spec.age_years
    atrophy = float(np.clip((age - 45) / 45, 0, 1) * r.uniform(0.5, 1.3))
    gm = r.uniform(35, 40)
    # spec.extra["calcified"]: basal ganglia and falx calcifications for certain (hemorrhage
    # mimics; training draws more of them than the population has). Drawn first all the same,
    # so the rest of the subject does not change.
    calcified = bool(spec.extra.get("calcified", False))
    return Subject(
        atrophy=atrophy, skull_t=r.uniform(5.5, 7.5), scalp_fat=r.uniform(2.5, 5.5),
        gm=gm, wm=gm - r.uniform(7, 10), csf=r.uniform(3, 10),
        bone_cortex=r.uniform(1500, 1850), diploe=r.uniform(450, 850),
        vent_scale=1.0 + 0.55 * atrophy + r.uniform(-0.08, 0.12),
        sulcus_w=0.35 + 1.2 * atrophy, csf_w=1.0 + 2.4 * atrophy, asym=r.uniform(-0.08, 0.08),
        pineal_calc=bool(r.random() < (0.2 if age < 30 else 0.65)),
        choroid_calc=bool(r.random() < (0.3 if age < 40 else 0.75)),
        falx_calc=bool(r.random() < 0.1 + 0.2 * (age > 50)) or calcified,
        bg_calc=bool(r.random() < 0.05 + 0.1 * (age > 60)) or calcified,
        suture_open=float(np.clip(1.3 - age / 60, 0.15, 1.0)),
        sinus_fluid=float(r.random() < 0.25) * r.uniform(0.2, 0.8),
    )


class Warp:
    """Mass effect: brain contents pushed across the midline (subfalcine shift), largest at
    the septum pellucidum level, zero at the falx attachments (vertex, frontal and occipital
    poles) and at the skull base. ``shift`` > 0 pushes toward the patient's left (+x)."""

    def __init__(self, shift: float):
        self.shift = float(shift)

    def u(self, x, y, z):
        if self.shift == 0:
            return np.zeros_like(x)
        g = np.exp(-(x * x) * F32(1 / (2 * 30.0 ** 2)))
        hz = np.exp(-((z - F32(12.0)) * F32(1 / 34.0)) ** 2)
        hy = np.exp(-((y + F32(5.0)) * F32(1 / 55.0)) ** 2)
        return F32(self.shift) * g * hz * hy

    def x_brain(self, x, y, z):
        """x in the undeformed brain frame for a point at (x, y, z)."""
        return x - self.u(x, y, z)

    def septum_shift(self) -> float:
        """Displacement of the septum pellucidum from the ideal midline (fixed point)."""
        y, z = np.float32(SEPTUM[1]), np.float32(SEPTUM[2])
        x = np.float32(0.0)
        for _ in range(60):
            x = self.u(np.float32(x), y, z)
        return float(x)


def cavity_floor(x, y):
    """Height of the supratentorial cavity floor: anterior fossa (orbital roofs, cribriform
    plate lower in the middle), middle fossa (temporal lobes; sella in the middle) and the
    tentorial level behind (the posterior fossa bowl is a separate ellipsoid)."""
    ax = np.abs(x)
    # anterior fossa: domed orbital roofs either side of the lower cribriform plate, sloping
    # down from the brow to the planum sphenoidale; middle fossa: a bowl, sella in the middle.
    # (Curved floors: an axial slab cuts them along curves, not as flat white plates.)
    f_ant = -31.0 + 10.0 * np.exp(-((ax - 26.0) / 13.0) ** 2) + 0.13 * np.clip(-45.0 - y, 0, 50)
    bowl = 0.010 * (ax - 40.0) ** 2 + 0.008 * (y + 8.0) ** 2
    f_mid = -53.0 + np.minimum(bowl, 14.0) + 17.0 * np.exp(-(x / 14.0) ** 2)
    y0 = -30.0 - 15.0 * np.minimum(ax / 50.0, 1.2) ** 2  # sphenoid ridge curves forward laterally
    f = f_ant + (f_mid - f_ant) * smoothstep(y0 - 7.0, y0 + 7.0, y)
    return f + (-42.0 - f) * smoothstep(4.0, 24.0, y)


def petrous(x, y, z):
    """Both petrous ridges: dense bone between the middle and posterior fossae."""
    d = None
    for sgn in (1, -1):
        a, b = (sgn * 58.0, 24.0, -54.0), (sgn * 14.0, -2.0, -42.0)
        p = capsule(x, y, z, a, b, lambda t: 6.0 - 2.5 * t, sz=1.3)
        d = p if d is None else np.minimum(d, p)
    return d


def cavity_sdf(x, y, z, canal: bool = True):
    """Signed distance-like field of the cranial cavity (negative inside)."""
    e = ellipsoid(x, y, z, CAVITY_C, CAVITY_R)
    d = np.maximum(e, (cavity_floor(x, y) - z).astype(F32))
    d = np.minimum(d, ellipsoid(x, y, z, POST_C, POST_R))
    d = np.maximum(d, -petrous(x, y, z))
    if canal:
        d = np.minimum(d, capsule(x, y, z, CANAL[0], CANAL[1], CANAL[2], sy=1.15))
    return d


class HeadModel:
    """Paints one head onto a canvas."""

    def __init__(self, spec: PhantomSpec, canvas: Canvas, warp: Warp):
        self.spec = spec
        self.c = canvas
        self.s = draw_subject(spec)
        self.warp = warp
        seed = spec.seed
        self.n_gyri = Noise(seed, "gyri", 16.0, band=True)
        self.n_smooth = Noise(seed, "smooth", 40.0)
        self.n_fine = Noise(seed, "fine", 6.0)
        self.n_folia = Noise(seed, "folia", 6.0, band=True)
        self.rng = rng_for(seed, "anatomy-detail")
        self.vent_side_scale = {1: 1.0, -1: 1.0}  # set by lesions (compression)
        self.xpad = abs(warp.shift) + 2.0

    # -- helpers ------------------------------------------------------------------------------
    def prim(self, lo, hi, sdf, value, label=None, warped=False, frac_mul=None):
        """Evaluate one primitive in its box, paint it, optionally label it."""
        c = self.c
        lo, hi = np.array(lo, float), np.array(hi, float)
        if warped:
            lo[0] -= self.xpad
            hi[0] += self.xpad
        sl = c.box(lo, hi)
        if sl is None:
            return None, None
        x, y, z = c.coords(sl)
        if warped:
            x = self.warp.x_brain(x, y, z)
        f = c.soft(sdf(x, y, z))
        if frac_mul is not None:
            f = f * frac_mul(sl)
        c.paint(sl, f, value(x, y, z) if callable(value) else F32(value))
        if label:
            c.label(label, sl, f)
        return sl, f

    def skull_t(self, x, y, z):
        """Skull thickness: vault ~6.5 mm (thinner in the temporal squama, thicker at the
        occiput), skull base: thin orbital roofs, thicker middle and posterior fossae."""
        t = F32(self.s.skull_t) + F32(0.9) * self.n_smooth(x, y, z)
        temporal = np.exp(-((np.abs(x) - 62.0) / 10.0) ** 2) * np.exp(-((z + 22.0) / 20.0) ** 2)
        occ = np.exp(-((y - 88.0) / 12.0) ** 2) * np.exp(-((z + 28.0) / 12.0) ** 2)
        vault = t * (1 - 0.5 * temporal) + 6.0 * occ
        tb = 2.5 + 3.0 * smoothstep(-45.0, -30.0, y) + 3.0 * smoothstep(0.0, 25.0, y)
        w = smoothstep(-42.0, -18.0, z)
        return (tb + (vault - tb) * w).astype(F32)

    def envelope(self, x, y, z):
        """Signed distance to the skin (head, face, neck); ears separately."""
        s = self.s
        cran = ellipsoid(x, y, z, CAVITY_C, CAVITY_R) - F32(s.skull_t + 2.5 + s.scalp_fat)
        base = ellipsoid(x, y, z, (0, 12, -62), (72, 82, 42))
        face = ellipsoid(x, y, z, (0, -50, -80), (56, 50, 50))
        neck = capsule(x, y, z, (0, 18, -100), (0, 22, -220), 55.0, sy=1.12)
        d = smin(smin(smin(cran, base, 8.0), face, 10.0), neck, 10.0)
        nose = capsule(x, y, z, (0, -92, -40), (0, -110, -76), 8.0, sx=1.1)
        tip = ellipsoid(x, y, z, (0, -106, -80), (13, 10, 9))
        d = smin(d, smin(nose, tip, 4.0), 5.0)
        for sgn in (1, -1):  # cheeks
            d = smin(d, ellipsoid(x, y, z, (sgn * 38.0, -78.0, -78.0), (18, 14, 22)), 6.0)
        chin = ellipsoid(x, y, z, (0, -88, -132), (22, 16, 16))
        return smin(d, chin, 8.0)

    @staticmethod
    def ear(x, y, z, sgn):
        shell = ellipsoid(x, y, z, (sgn * 73.0, 16.0, -44.0), (6.0, 16.0, 29.0))
        concha = ellipsoid(x, y, z, (sgn * 78.0, 13.0, -46.0), (3.0, 8.0, 11.0))
        return np.maximum(shell, -concha)

    # -- painting -----------------------------------------------------------------------------
    def paint_all(self) -> None:
        c = self.c
        # cavity field once on the whole grid (smooth: coarse + upsample is exact enough)
        c.cav = c.coarse(lambda x, y, z: cavity_sdf(x, y, z, canal=True), c.full, 4)
        self.paint_soft_tissue()
        self.paint_face_and_base()
        self.paint_skull()
        self.paint_contents()
        self.paint_headrest()

    def paint_soft_tissue(self) -> None:
        c, s = self.c, self.s
        sl = c.full
        env = c.coarse(self.envelope, sl, 4)
        c.env = env
        c.paint(sl, c.soft(env), F32(42.0))
        fat = c.soft(np.abs(env + F32(2.0 + s.scalp_fat / 2)) - F32(s.scalp_fat / 2))
        c.paint(sl, fat, F32(-95.0))
        for sgn in (1, -1):
            self.prim((sgn * 73 - 12, -5, -78), (sgn * 73 + 12, 36, -12),
                      lambda x, y, z, g=sgn: self.ear(x, y, z, g), 30.0, label="ears")

    def paint_face_and_base(self) -> None:
        s = self.s
        bone = F32(s.bone_cortex)
        P = self.prim
        # deep facial soft tissue: buccal fat pads and muscles of mastication, neck muscles
        for sgn in (1, -1):
            P((sgn * 38 - 16, -92, -100), (sgn * 38 + 16, -64, -60),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 38.0, -78.0, -80.0), (13, 11, 17)),
              -85.0)
            P((sgn * 45 - 10, -48, -125), (sgn * 45 + 10, -8, -68),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 45.0, -28.0, -96.0), (8, 16, 26)),
              52.0)
            P((sgn * 71 - 8, -45, -60), (sgn * 71 + 8, 25, 10),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 71.0, -10.0, -25.0), (6.5, 32, 32)),
              50.0)
            P((sgn * 30 - 10, -36, -100), (sgn * 30 + 10, -4, -62),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 30.0, -20.0, -82.0), (7, 14, 18)),
              48.0)
        P((-45, 15, -140), (45, 75, -75),
          lambda x, y, z: ellipsoid(x, y, z, (0, 48, -108), (40, 24, 32)), 52.0)
        # fat planes in the neck
        P((-30, 30, -140), (30, 80, -80),
          lambda x, y, z: np.maximum(np.abs(x) - F32(1.5), ellipsoid(x, y, z, (0, 55, -110),
                                                                     (30, 22, 30))), -80.0)

        # skull base bone masses: petrous ridges, mastoids, clivus, sphenoid, condyles
        fine = self.n_fine
        sl, f = P((-70, -10, -72), (70, 34, -30), petrous, lambda x, y, z: F32(1.2) * bone
                  + F32(120.0) * fine(x, y, z), label="skull")
        if sl is not None:
            self.c.label("_petrous", sl, f)
        for sgn in (1, -1):
            sl, f = P((sgn * 56 - 13, 14, -84), (sgn * 56 + 13, 46, -48),
                      lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 56.0, 30.0, -66.0),
                                                       (11.0, 13.0, 15.0)),
                      lambda x, y, z: F32(0.8) * bone, label="skull")
            P((sgn * 56 - 13, 14, -84), (sgn * 56 + 13, 46, -48),
              lambda x, y, z, g=sgn: np.maximum(
                  ellipsoid(x, y, z, (g * 56.0, 30.0, -66.0), (9.5, 11.5, 13.5)),
                  fine(x * 1.7, y * 1.7, z * 1.7) * F32(-3.0) - F32(0.6)),
              -900.0)
            P((sgn * 70 - 25, 6, -54), (sgn * 70 + 25, 20, -40),
              lambda x, y, z, g=sgn: capsule(x, y, z, (g * 95.0, 14.0, -48.0),
                                             (g * 48.0, 12.0, -46.0), 3.8), -950.0)
            P((sgn * 50 - 10, -8, -66), (sgn * 50 + 10, 4, -50),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 50.0, -2.0, -58.0), (9, 5, 6)),
              F32(0.7) * bone)
            P((sgn * 17 - 8, 10, -92), (sgn * 17 + 8, 34, -76),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 17.0, 22.0, -84.0), (7, 11, 7)),
              F32(0.8) * bone, label="skull")
        P((-10, -14, -84), (10, 28, -32),
          lambda x, y, z: capsule(x, y, z, (0, -6, -40), (0, 22, -78), 6.5, sx=0.8),
          lambda x, y, z: F32(0.6) * bone + F32(80.0) * fine(x, y, z), label="skull")
        P((-22, -38, -62), (22, -2, -30),
          lambda x, y, z: ellipsoid(x, y, z, (0, -20, -46), (20, 17, 15)),
          F32(0.55) * bone, label="skull")
        P((-22, -38, -62), (22, -2, -30),
          lambda x, y, z: ellipsoid(x, y, z, (0, -20, -48), (14, 12, 10)), -920.0)
        # C1 ring, dens, C2, pharynx
        P((-30, -6, -100), (30, 52, -84),
          lambda x, y, z: np.maximum(np.abs(ellipsoid(x, y, z, (0, 24, -92), (25, 24, 200)))
                                     - F32(3.5), np.abs(z + 92) - F32(5.0)),
          F32(0.85) * bone)
        P((-8, 0, -116), (8, 14, -78),
          lambda x, y, z: capsule(x, y, z, (0, 6, -82), (0, 8, -112), 5.5), F32(0.7) * bone)
        P((-12, -2, -134), (12, 18, -110),
          lambda x, y, z: ellipsoid(x, y, z, (0, 8, -122), (10, 9, 10)), F32(0.55) * bone)
        P((-12, -20, -165), (12, 8, -64),
          lambda x, y, z: capsule(x, y, z, (0, -10, -66), (0, -6, -165), 8.5, sx=0.75, sy=1.3),
          -980.0)
        self.paint_face_bones()
        self.paint_orbits()

    def paint_face_bones(self) -> None:
        s = self.s
        bone = F32(s.bone_cortex)
        P = self.prim
        fine = self.n_fine
        # maxilla / zygoma: a bone block hollowed by the sinuses and the nasal cavity
        # maxilla: soft tissue block (cheeks, alveolar soft tissue); bone only as thin walls
        # around the sinuses and nasal cavity and as the alveolar process
        P((-50, -95, -102), (50, -30, -42),
          lambda x, y, z: ellipsoid(x, y, z, (0, -62, -72), (44, 30, 28)), 40.0)
        P((-34, -92, -102), (34, -40, -86),
          lambda x, y, z: ellipsoid(x, y, z, (0, -66, -95), (28, 25, 8)),
          lambda x, y, z: F32(0.5) * bone + F32(80.0) * fine(x, y, z), label="face_bone")
        for sgn in (1, -1):
            P((sgn * 53 - 12, -74, -58), (sgn * 53 + 12, -6, -44),
              lambda x, y, z, g=sgn: capsule(x, y, z, (g * 46.0, -68.0, -50.0),
                                             (g * 60.0, -12.0, -52.0), 4.5),
              F32(0.85) * bone, label="face_bone")
            P((sgn * 24 - 18, -84, -91), (sgn * 24 + 18, -40, -49),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 24.0, -62.0, -70.0),
                                               (16.5, 20.5, 19.5)), 0.55 * s.bone_cortex,
              label="face_bone")
            sl, f = P((sgn * 24 - 16, -82, -89), (sgn * 24 + 16, -42, -51),
                      lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 24.0, -62.0, -70.0),
                                                       (15.0, 19.0, 18.0)), -960.0)
            if s.sinus_fluid > 0 and sl is not None:  # dependent fluid in the sinus
                level = -43.0 - 24.0 * s.sinus_fluid
                P((sgn * 24 - 16, -82, -89), (sgn * 24 + 16, -42, -51),
                  lambda x, y, z, g=sgn, lv=level: np.maximum(
                      ellipsoid(x, y, z, (g * 24.0, -62.0, -70.0), (15.0, 19.0, 18.0)),
                      F32(lv) - y), 22.0)
        P((-12, -103, -91), (12, -33, -37),
          lambda x, y, z: ellipsoid(x, y, z, (0, -68, -64), (10.5, 33.5, 25.5)),
          0.5 * s.bone_cortex)
        P((-10, -101, -89), (10, -35, -39),
          lambda x, y, z: ellipsoid(x, y, z, (0, -68, -64), (9.0, 32.0, 24.0)), -950.0)
        for sgn in (1, -1):
            for zc, rz in ((-74.0, 4.5), (-62.0, 3.5)):
                P((sgn * 6.5 - 4, -85, zc - rz - 1), (sgn * 6.5 + 4, -39, zc + rz + 1),
                  lambda x, y, z, g=sgn, zz=zc, r=rz: ellipsoid(x, y, z, (g * 6.5, -62.0, zz),
                                                                (3.2, 22.0, r)), 35.0)
        P((-2, -101, -89), (2, -35, -39),
          lambda x, y, z: np.maximum(np.abs(x) - F32(0.9),
                                     ellipsoid(x, y, z, (0, -68, -64), (9.0, 32.0, 24.0))),
          300.0, label="face_bone")
        # ethmoid air cells between the orbits (honeycomb)
        P((-11, -81, -53), (11, -39, -27),
          lambda x, y, z: ellipsoid(x, y, z, (0, -60, -40), (10.0, 20.0, 12.0)), 400.0)
        P((-11, -81, -53), (11, -39, -27),
          lambda x, y, z: np.maximum(ellipsoid(x, y, z, (0, -60, -40), (10.0, 20.0, 12.0)),
                                     F32(-3.0) * fine(x * 1.6, y * 1.6, z * 1.6) - F32(1.2)),
          -900.0)
        # brow (frontal bone) with the frontal sinus
        P((-31, -103, -29), (31, -81, 1),
          lambda x, y, z: ellipsoid(x, y, z, (0, -90, -14), (30, 10, 14)), bone, label="skull")
        P((-15, -98, -20), (15, -86, 0),
          lambda x, y, z: ellipsoid(x, y, z, (0, -91, -10), (14, 5, 9)), -950.0)
        # hard palate, maxillary teeth
        P((-25, -89, -100), (25, -35, -92),
          lambda x, y, z: ellipsoid(x, y, z, (0, -62, -96), (24, 26, 3.0)), bone,
          label="face_bone")
        for t in np.linspace(-1, 1, 14):
            ang = t * 1.35
            tx, ty = 25 * np.sin(ang), -82 + 34 * (1 - np.cos(ang))
            P((tx - 5, ty - 5, -113), (tx + 5, ty + 5, -95),
              lambda x, y, z, a=tx, b=ty: ellipsoid(x, y, z, (a, b, -104.0), (3.6, 3.6, 8.0)),
              2600.0, label="face_bone")
        # mandible: condyle neck, ramus, angle, body
        chain = [(50, -2, -62), (46, -14, -90), (42, -30, -124), (30, -66, -128),
                 (14, -84, -130), (0, -88, -130)]
        for sgn in (1, -1):
            pts = [(sgn * p[0], p[1], p[2]) for p in chain]
            for a, b in zip(pts[:-1], pts[1:]):
                lo = np.minimum(a, b) - 14
                hi = np.maximum(a, b) + 14
                P(lo, hi, lambda x, y, z, a=a, b=b: capsule(x, y, z, a, b, 6.0, sz=0.45), bone,
                  label="face_bone")
                P(lo, hi, lambda x, y, z, a=a, b=b: capsule(x, y, z, a, b, 6.0, sz=0.45)
                  + F32(2.2), lambda x, y, z: F32(380.0) + F32(60.0) * fine(x, y, z))
            P((sgn * 45 - 8, -36, -96), (sgn * 45 + 8, -8, -60),
              lambda x, y, z, g=sgn: capsule(x, y, z, (g * 46.0, -14.0, -90.0),
                                             (g * 44.0, -30.0, -66.0), 3.5),
              F32(0.8) * bone, label="face_bone")

    def paint_orbits(self) -> None:
        s = self.s
        P = self.prim
        for sgn in (1, -1):
            apex, rim = (sgn * 13.0, -30.0, -39.0), (sgn * 33.0, -88.0, -40.0)
            lo = (min(apex[0], rim[0]) - 24, -112, -66)
            hi = (max(apex[0], rim[0]) + 24, -24, -14)

            def cone(x, y, z, a=apex, b=rim):
                return capsule(x, y, z, a, b, lambda t: 3.0 + 16.0 * t ** 0.8, sz=1.0)

            P(lo, hi, lambda x, y, z, f=cone: f(x, y, z) - F32(1.3), 0.6 * s.bone_cortex,
              label="face_bone")
            P(lo, hi, cone, -95.0)
            g = (sgn * 32.0, -72.0, -40.0)
            glo, ghi = np.array(g) - 14, np.array(g) + 14
            P(glo, ghi, lambda x, y, z, c=g: ellipsoid(x, y, z, c, (12.0, 12.0, 12.0)), 48.0)
            P(glo, ghi, lambda x, y, z, c=g: ellipsoid(x, y, z, c, (12.0, 12.0, 12.0))
              + F32(1.1), 10.0)
            P(glo, ghi, lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 32.0, -81.5, -40.0),
                                                         (4.6, 1.9, 4.6)), 115.0)
            P((sgn * 22 - 12, -64, -46), (sgn * 22 + 12, -26, -33),
              lambda x, y, z, g=sgn: capsule(x, y, z, (g * 30.0, -60.5, -40.0),
                                             (g * 14.0, -30.0, -39.0), 2.3), 32.0)
            for dx, dz in ((-11.0, 0.0), (11.0, 0.0), (0.0, 10.0), (0.0, -10.0)):
                a = (g[0] + sgn * dx, -68.0, -40.0 + dz)
                b = (sgn * 15.0 + sgn * dx * 0.2, -33.0, -39.0 + dz * 0.2)
                P(np.minimum(a, b) - 4, np.maximum(a, b) + 4,
                  lambda x, y, z, a=a, b=b: capsule(x, y, z, a, b, 2.4), 50.0)

    def paint_skull(self) -> None:
        """Vault and skull base as one shell around the cavity: outer/inner tables with
        diploe between them where the bone is thick enough, sutures as thin lucent lines."""
        c, s = self.c, self.s
        sl = c.full
        x, y, z = c.coords(sl)
        cav = c.coarse(lambda a, b, d: cavity_sdf(a, b, d, canal=False), sl, 4)
        t = c.coarse(self.skull_t, sl, 4)
        canal = c.coarse(lambda a, b, d: capsule(a, b, d, CANAL[0], CANAL[1], CANAL[2],
                                                  sy=1.15), sl, 4)
        shell = np.maximum(np.maximum(cav - t, -cav), -canal)
        f = c.soft(shell)
        depth = np.clip(np.minimum(cav, t - cav), 0, None)
        diploe = np.clip((depth - 1.6) / 1.0, 0, 1) * (t > 4.0)
        val = F32(s.bone_cortex) + (F32(s.diploe) - F32(s.bone_cortex)) * diploe
        val = val + F32(90.0) * c.coarse(lambda a, b, d: self.n_smooth(a * 5, b * 5, d * 5),
                                          sl, 4)
        bone = f > 0  # sutures only where there is bone (a fraction of the grid)
        sut = self.sutures(x[bone], y[bone], z[bone])
        gap = np.clip(1.0 - np.abs(sut) / 0.8, 0, 1) * F32(s.suture_open)
        val[bone] *= 1 - 0.8 * gap
        c.paint(sl, f, val)
        c.label("skull", sl, f)

    @staticmethod
    def sutures(x, y, z):
        """Distance-like field whose zero set holds the coronal, sagittal, lambdoid and
        squamous sutures (the bone plates' borders)."""
        cor = (y + 20.0) - 0.137 * (z - 63.0)
        lam = (y - 75.0) - 0.267 * (z - 45.0)
        sag = np.where((cor > 0) & (lam < 0) & (z > 15), np.abs(x), 1e3)
        sq = np.where((np.abs(x) > 35) & (cor > 0) & (lam < 0),
                      z - (2.0 - 0.004 * (y - 20.0) ** 2), 1e3)
        out = np.minimum(np.minimum(np.abs(cor), np.abs(lam)), np.minimum(sag, np.abs(sq)))
        return out.astype(F32)

    @staticmethod
    def plate(x, y, z):
        """Which skull plate lies over a point: 0 frontal, 1 occipital, 2/3 parietal
        left/right, 4/5 temporal (squamous) left/right (borders as in :meth:`sutures`)."""
        cor = (y + 20.0) - 0.137 * (z - 63.0)
        lam = (y - 75.0) - 0.267 * (z - 45.0)
        left = x > 0
        temporal = (np.abs(x) > 35) & (z < 2.0 - 0.004 * (y - 20.0) ** 2)
        out = np.where(left, 2, 3) + np.where(temporal, 2, 0)
        out = np.where(cor < 0, 0, np.where(lam > 0, 1, out))
        return out.astype(np.int8)

    def paint_contents(self) -> None:
        c, s, w = self.c, self.s, self.warp
        sl = c.box((-75, -95, -95), (75, 100, 70))
        c.content_box = sl
        x, y, z = c.coords(sl)
        cav = c.cav[sl]
        fcav = c.soft(cav)
        c.label("brain", sl, fcav)
        c.paint(sl, fcav, F32(s.csf))
        xb = c.coarse(w.x_brain, sl, 4) if w.shift else x

        # brain surface under a CSF layer; sulci from the zero set of a band-pass field
        depth = -cav - F32(s.csf_w)  # depth below the cortical surface
        infra = ellipsoid(x, y, z, POST_C, POST_R) < 0
        infra &= z < self.tentorium_z(x, y)
        gy = c.coarse(self.gyri, sl, 2)
        dist = np.abs(gy) / F32(self.n_gyri.grad_mm)  # mm to the nearest sulcus centre
        # cerebellar folia: finer, flatter pattern, evaluated only in the posterior fossa box
        pf = c.box((POST_C[0] - POST_R[0], POST_C[1] - POST_R[1], POST_C[2] - POST_R[2]),
                   (POST_C[0] + POST_R[0], POST_C[1] + POST_R[1], -15.0))
        if pf is not None:
            pf = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(pf, sl))
            rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(pf, sl))
            if all(r.start < r.stop for r in rel):
                fol = np.abs(c.coarse(lambda a, b, d: self.n_folia(a * 0.7, b * 0.7, d * 2.2),
                                      pf, 2)) / F32(self.n_folia.grad_mm)
                dist[rel] = np.where(infra[rel], fol * 0.6, dist[rel])
        sdepth = np.where(infra, F32(8.0), F32(16.0 + 4 * s.atrophy))
        hw0 = F32(0.45 + 1.0 * s.sulcus_w)
        half = hw0 - depth * (hw0 + F32(1.0)) / sdepth  # sulcal half-width, < 0 below fundus
        brain_sdf = np.maximum(-depth, half - dist)
        # interhemispheric fissure above the corpus callosum; tentorial gap
        cc_top = 27.0 - 0.004 * (y + 5) ** 2
        fiss = np.maximum(np.abs(xb) - F32(0.7 + 1.3 * s.atrophy), cc_top - z)
        brain_sdf = np.maximum(brain_sdf, -fiss)
        fb = c.soft(brain_sdf)
        # cortex: ~2.5 mm ribbon under the surface and along each sulcus
        gm_d = np.minimum(depth, dist - np.maximum(half, 0))
        grey = np.clip((F32(3.0) - gm_d) / 1.5, 0, 1) * np.clip(1.0 - depth / (sdepth + 4), 0, 1)
        grey = np.maximum(grey, np.clip((F32(2.8) - depth) / 1.5, 0, 1))
        grey = np.where(infra, np.clip(0.35 + 0.45 * grey, 0, 1), grey)
        tissue = F32(s.wm) + (F32(s.gm) - F32(s.wm)) * grey
        c.paint(sl, fb, tissue)
        c.csf_space = (fcav * (1 - fb)).astype(F32)  # sulcal/cisternal CSF: where SAH can lie
        del gy, dist, half, brain_sdf, grey, tissue, depth

        self.paint_deep()
        self.paint_ventricles()
        self.paint_cisterns()
        # falx: thin dense sheet in the fissure; tentorium over the cerebellum
        P = self.prim
        P((-3, -95, -10), (3, 95, 72),
          lambda x, y, z: np.maximum(np.maximum(np.abs(x) - F32(0.6),
                                                F32(27.0 + 4) - 0.004 * (y + 5) ** 2 - z),
                                     ellipsoid(x, y, z, CAVITY_C, CAVITY_R) + F32(0.5)),
          58.0, warped=True)
        P((-56, 10, -50), (56, 90, -20),
          lambda x, y, z: np.maximum(np.maximum(np.abs(z - self.tentorium_z(x, y)) - F32(0.45),
                                                ellipsoid(x, y, z, POST_C, POST_R) + F32(0.8)),
                                     F32(8.0) - np.sqrt(x * x + (y - 18) ** 2) * 0.5),
          s.gm + 6.0)
        self.paint_sinuses()
        # midline plane label (one model pixel wide) in the supratentorial brain
        mid = np.clip(1.0 - np.abs(xb) / c.w_xy, 0, 1) * fcav * (z > self.tentorium_z(x, y))
        c.label("midline", sl, mid)
        self.paint_calcifications()

    def paint_sinuses(self) -> None:
        """Dural venous sinuses: unenhanced venous blood (40-60 HU) against the inner table,
        the classic mimics of a thin subdural or tentorial bleed (hard negatives)."""
        s = self.s
        hu = float(self.rng.uniform(40, 58))

        def sss(x, y, z):  # superior sagittal sinus: triangle at the falx attachment
            depth = -cavity_sdf(x, y, z, canal=False)
            grow = smoothstep(-70.0, 10.0, y)
            d = np.abs(x) - F32(0.55) * (F32(6.5) * grow - depth)
            return np.maximum(d, -depth)

        self.prim((-6, -75, -40), (6, 100, 75), sss, hu, warped=False)

        def transverse(x, y, z):  # along the tentorium's attachment to the occipital bone
            cav = cavity_sdf(x, y, z, canal=False)
            d = np.maximum(np.abs(z - self.tentorium_z(x, y)) - F32(3.5), -cav - F32(5.0))
            d = np.maximum(d, cav)
            return np.maximum(d, F32(30.0) - y)

        self.prim((-62, 28, -75), (62, 100, -5), transverse, hu)
        del s

    def gyri(self, x, y, z):
        """Sulcal pattern: the band-pass field sampled at the radial projection of the point
        on a sphere (slowly varying with depth), so sulci are sheets running inward from the
        surface, as real sulci do, and stay sharp on thick axial slices."""
        qx = (x - F32(CAVITY_C[0])) * F32(1 / CAVITY_R[0])
        qy = (y - F32(CAVITY_C[1])) * F32(1 / CAVITY_R[1])
        qz = (z - F32(CAVITY_C[2])) * F32(1 / CAVITY_R[2])
        r = np.sqrt(qx * qx + qy * qy + qz * qz) + F32(1e-3)
        rad = F32(75.0) + F32(0.35 * 75.0) * (r - 1)  # ~0.35 mm of field per mm of depth
        k = rad / r
        return self.n_gyri(qx * k, qy * k, qz * k)

    @staticmethod
    def tentorium_z(x, y):
        """Height of the tentorium (only behind the petrous ridges; -inf in front)."""
        t = -22.0 - 0.28 * (y - 20.0) - 0.004 * x * x
        return np.where(y > 2.0, t, -1e3).astype(F32)

    def paint_deep(self) -> None:
        s = self.s
        P = self.prim
        gm = s.gm - 1.0
        for sgn in (1, -1):
            for cc, rr in (((12, -15, 10), (6, 10, 9)), ((24, -1, 1), (7, 15, 9)),
                           ((10, 12, 3), (9, 12, 9))):
                cen = (sgn * cc[0], cc[1], cc[2])
                P(np.array(cen) - rr, np.array(cen) + rr,
                  lambda x, y, z, a=cen, b=rr: ellipsoid(x, y, z, a, b), gm, warped=True)
            # insular cortex and Sylvian fissure
            P((sgn * 38 - 4, -30, -16), (sgn * 38 + 4, 14, 16),
              lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 38.0, -8.0, 0.0), (3.0, 20.0, 14.0)),
              s.gm, warped=True)
            # insular cistern (thin, vertical) and the lateral (Sylvian) fissure: a sheet from
            # the insula to the lateral surface, rising backwards, separating the temporal lobe
            hw = 0.8 + 0.9 * s.atrophy
            sl, f = P((sgn * 41 - 4, -28, -10), (sgn * 41 + 4, 10, 12),
                      lambda x, y, z, g=sgn: ellipsoid(x, y, z, (g * 41.0, -8.0, 1.0),
                                                       (hw, 17.0, 10.0)),
                      s.csf, warped=True)
            self._csf(sl, f)

            def sylvian(x, y, z, g=sgn):
                zs = -4.0 + 0.45 * (y + 8.0) - 0.25 * (g * x - 41.0)  # rises backwards/outwards
                zs = zs + 3.0 * self.n_smooth(x * 3, y * 3, z * 3)
                d = np.abs(z - zs) - F32(hw)
                d = np.maximum(d, g * (g * 40.0 - x))  # lateral to the insula
                return np.maximum(d, np.abs(y + 12.0) - F32(18.0))

            sl, f = P((sgn * 55 - 16, -36, -16), (sgn * 55 + 16, 20, 14), sylvian, s.csf,
                      warped=True, frac_mul=lambda b: np.clip(-self.c.cav[b] - 0.5, 0, 1))
            self._csf(sl, f)
        P((-14, 0, -34), (14, 28, -6),
          lambda x, y, z: ellipsoid(x, y, z, (0, 14, -20), (13, 12, 12)), s.wm + 3)
        P((-14, -4, -86), (14, 32, -30),
          lambda x, y, z: capsule(x, y, z, (0, 10, -34), (0, 18, -76), 12.5, sy=0.95),
          s.wm + 3)

    def _csf(self, sl, f) -> None:
        if sl is None:
            return
        c = self.c
        # intersect the primitive's box with the content box (where csf_space lives)
        both = [slice(max(a.start, b.start), min(a.stop, b.stop))
                for a, b in zip(sl, c.content_box)]
        if any(x.start >= x.stop for x in both):
            return
        rel = tuple(slice(x.start - b.start, x.stop - b.start) for x, b in zip(both, c.content_box))
        own = tuple(slice(x.start - a.start, x.stop - a.start) for x, a in zip(both, sl))
        np.maximum(c.csf_space[rel], f[own], out=c.csf_space[rel])

    def ventricle_sdf(self, xb, y, z, sgn):
        """Lateral ventricle of one side as a chain of capsules (frontal horn, body, atrium,
        occipital and temporal horns); ``sgn`` +1 = left (+x)."""
        s = self.s
        k = s.vent_scale * (1 + sgn * s.asym) * self.vent_side_scale[sgn]
        path = [(6.5, -36, 8), (9.5, -18, 17), (12.0, 2, 20), (16.0, 18, 18), (22.0, 30, 10)]
        occ = [(22.0, 30, 10), (18.0, 48, 6)]
        temp = [(22.0, 30, 10), (30.0, 14, -8), (30.0, -6, -20)]
        radii = [3.2, 4.2, 4.0, 4.5]
        d = None
        for (a, b), r in zip(zip(path[:-1], path[1:]), radii):
            a = (sgn * a[0], a[1], a[2])
            b = (sgn * b[0], b[1], b[2])
            seg = capsule(xb, y, z, a, b, r * k, sx=1.0, sz=0.75)
            d = seg if d is None else smin(d, seg, 2.0)
        for chain, r in ((occ, 2.6), (temp, 2.0)):
            for a, b in zip(chain[:-1], chain[1:]):
                a = (sgn * a[0], a[1], a[2])
                b = (sgn * b[0], b[1], b[2])
                d = smin(d, capsule(xb, y, z, a, b, r * k, sz=0.9), 2.0)
        # keep the septum pellucidum: the ventricle never reaches the midline
        return np.maximum(d, F32(1.1) - sgn * xb)

    def paint_ventricles(self) -> None:
        s = self.s
        P = self.prim
        m = 8.0 * s.vent_scale
        for sgn, name in ((1, "ventricle_left"), (-1, "ventricle_right")):
            lo = (min(0, sgn * 40) - m * 0.3, -45 - m, -30 - m)
            hi = (max(0, sgn * 40) + m * 0.3, 58 + m, 28 + m)
            P(lo, hi, lambda x, y, z, g=sgn: self.ventricle_sdf(x, y, z, g), s.csf, label=name,
              warped=True)
        P((-8, -14, -17), (8, 18, 5),
          lambda x, y, z: ellipsoid(x, y, z, (0, 2, -6), (1.6 + 2.5 * s.atrophy, 14.0, 9.0)),
          s.csf, label="ventricle_other", warped=True)
        P((-8, 30, -56), (8, 42, -40),
          lambda x, y, z: ellipsoid(x, y, z, (0, 36, -48), (7.0, 4.0, 7.0)), s.csf,
          label="ventricle_other")

    def paint_cisterns(self) -> None:
        s = self.s
        P = self.prim
        for cen, rad in (((0, -8, -26), (13, 8, 5)), ((0, 30, -6), (11, 6, 6)),
                         ((0, 62, -70), (16, 10, 10)), ((0, -2, -48), (10, 4, 16))):
            sl, f = P(np.array(cen) - rad, np.array(cen) + rad,
                      lambda x, y, z, a=cen, b=rad: ellipsoid(x, y, z, a, b), s.csf)
            self._csf(sl, f)
        # ambient cistern: a thin crescent around the back and sides of the midbrain
        sl, f = P((-18, -3, -30), (18, 31, -10),
                  lambda x, y, z: np.maximum(np.abs(ellipsoid(x, y, z, (0, 14, -20),
                                                              (15.0, 14.0, 8))) - F32(1.0),
                                             F32(8.0) - y), s.csf)
        self._csf(sl, f)

    def paint_calcifications(self) -> None:
        s = self.s
        r = self.rng
        calcs = []
        if s.pineal_calc:
            calcs.append(((0, 24, 0), r.uniform(2, 3.8), r.uniform(150, 450)))
        if s.choroid_calc:
            for sgn in (1, -1):
                calcs.append(((sgn * 21.0, 29, 11), r.uniform(2, 4), r.uniform(90, 300)))
        if s.falx_calc:
            calcs.append(((0, r.uniform(-60, 40), r.uniform(35, 55)), r.uniform(1.5, 3.5),
                          r.uniform(200, 700)))
        if s.bg_calc:
            for sgn in (1, -1):
                calcs.append(((sgn * 20.0, 0, 0), r.uniform(1.5, 3.0), r.uniform(100, 300)))
        for cc, rad, hu in calcs:
            rr = (rad, rad * 1.2, rad)
            self.prim(np.array(cc) - 5, np.array(cc) + 5,
                      lambda x, y, z, a=cc, b=rr: ellipsoid(x, y, z, a, b), hu, warped=True)
        self.c.calcifications = len(calcs)

    def paint_headrest(self) -> None:
        """Carbon headrest cradle and foam pad under the head (patient frame, gravity +y).
        Image (i, j) -> patient (x, y) does not depend on the slice, so one 2D pattern
        serves every slice."""
        c, g = self.c, self.c.geom
        inside = c.env < 0
        if not inside.any():
            return
        # lowest point (max patient y) of the head on the model grid
        ks, js, is_ = np.nonzero(inside)
        a = g.model_affine
        py = a[1, 0] * is_ + a[1, 1] * js + a[1, 2] * ks + a[1, 3]
        n = int(np.argmax(py))
        bx = a[0, 0] * is_[n] + a[0, 1] * js[n] + a[0, 3]
        by = float(py[n]) + 0.5
        nj, ni = c.shape[1:]
        jj, ii = np.mgrid[0:nj, 0:ni].astype(F32)
        px = F32(a[0, 0]) * ii + F32(a[0, 1]) * jj + F32(a[0, 3])
        pyy = F32(a[1, 0]) * ii + F32(a[1, 1]) * jj + F32(a[1, 3])
        dy = pyy - (F32(by) + (px - F32(bx)) ** 2 * F32(1 / (2 * 120.0)))
        w = F32(g.model_pixel)
        side = np.clip(0.5 - (np.abs(px - F32(bx)) - 100.0) / w, 0, 1)
        pad = np.clip(0.5 + dy / w, 0, 1) * np.clip(0.5 - (dy - 10.0) / w, 0, 1) * side
        shell = np.clip(0.5 + (dy - 10.0) / w, 0, 1) * np.clip(0.5 - (dy - 14.0) / w, 0, 1) * side
        for f, v in ((pad, F32(-850.0)), (shell, F32(160.0))):
            m = f > 0
            if m.any():
                h = c.hu[:, m]
                h += f[m] * (v - h)
                c.hu[:, m] = h
