"""Hemorrhages: where each subtype lies, its shape and density, and the mass effect it causes.

- EDH: biconvex lens between inner table and dura; tapers to zero at the sutures (the dura is
  fixed there), so it never crosses one.
- SDH: crescent along the inner table over a wide convexity, free to cross sutures, stops at
  the falx; acute hyperdense or subacute near-isodense.
- SAH: blood filling the sulcal/cisternal CSF of a region (basal cisterns + Sylvian fissures, or
  a convexity): thin by construction.
- IPH: irregular blob (noise-perturbed ellipsoid) in deep grey matter, a lobe or the cerebellum,
  with a hypodense edema rim.
- IVH: blood in the ventricles below a horizontal fluid level in the *scanner* frame (gravity:
  posterior in a supine patient), so it layers dependently whatever the head pose.

Lesion geometry is in the head frame. Sizes derive from the spec's target volume; the reported
volumes are measured on the final masks, never the targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.phantom.anatomy import CAVITY_C, CAVITY_R, HeadModel, cavity_sdf
from models.phantom.fields import F32, Canvas, Noise, ellipsoid, smoothstep
from models.phantom.spec import PhantomSpec, rng_for


@dataclass
class Lesion:
    subtype: str
    side: int  # +1 left, -1 right, 0 midline/bilateral
    target_ml: float
    params: dict = field(default_factory=dict)

    @property
    def mass_ml(self) -> float:
        """Volume that pushes the brain (edema counts for IPH; SAH/IVH push little)."""
        k = {"epidural": 1.0, "subdural": 1.0, "intraparenchymal": 1.5,
             "subarachnoid": 0.1, "intraventricular": 0.1}[self.subtype]
        return k * self.target_ml


def plan_lesions(spec: PhantomSpec) -> list[Lesion]:
    """Where and how big: drawn from the seed, per subtype."""
    out = []
    main_side = 1 if spec.side == "left" else -1
    for n, st in enumerate(spec.subtypes):
        r = rng_for(spec.seed, "lesion:" + st)
        # the first lesion lies on ``spec.side``; further ones mostly on the same side
        side = main_side if (r.random() < 0.85 or n == 0) else -main_side
        p: dict = {}
        if st == "epidural":
            sites = {"temporal": (60, -10, -12), "parietal": (48, 10, 42),
                     "frontal": (28, -70, 18), "occipital": (22, 78, 4)}
            name = str(r.choice(list(sites), p=[0.5, 0.25, 0.15, 0.1]))
            p.update(site=name, centre=sites[name], hu=r.uniform(60, 85),
                     swirl=bool(r.random() < 0.3), ratio=r.uniform(0.4, 0.6),
                     aspect=r.uniform(0.75, 1.3), roll=r.uniform(0, np.pi))
        elif st == "subdural":
            centre = (r.uniform(45, 60), r.uniform(-30, 25), r.uniform(0, 35))
            hu = {"acute": r.uniform(58, 78), "subacute": r.uniform(32, 42),
                  "mixed": r.uniform(18, 30)}[spec.sdh_age]
            p.update(centre=centre, hu=hu, extent=r.uniform(0.75, 1.0),
                     aspect=r.uniform(1.2, 1.7), roll=r.uniform(-0.4, 0.4))
            p.update(age=spec.sdh_age, layer_hu=r.uniform(55, 72), layer_frac=r.uniform(0.25, 0.5))
        elif st == "subarachnoid":
            pattern = str(r.choice(["basal", "convexity", "sylvian"], p=[0.4, 0.35, 0.25]))
            pattern = spec.extra.get("sah_pattern", pattern)
            if pattern == "convexity":
                d = np.array([side * r.uniform(0.5, 0.9), r.uniform(-0.6, 0.6),
                              r.uniform(0.1, 0.8)])
                d /= np.linalg.norm(d)
                centre = tuple(np.array(CAVITY_C) + d * np.array(CAVITY_R) * 0.85)
            elif pattern == "sylvian":
                centre = (side * 42.0, -8.0, 2.0)
            else:
                centre = (0.0, -4.0, -22.0)
                side = 0
            p.update(pattern=pattern, centre=centre, hu=r.uniform(58, 80),
                     density=r.uniform(0.75, 1.0))
        elif st == "intraparenchymal":
            site = str(r.choice(["putamen", "thalamus", "lobar", "cerebellar"],
                                p=[0.35, 0.2, 0.35, 0.1]))
            if site == "putamen":
                centre = (side * 24.0, -2.0, 2.0)
            elif site == "thalamus":
                centre = (side * 12.0, 12.0, 4.0)
            elif site == "cerebellar":
                centre = (side * 22.0, 55.0, -55.0)
            else:
                d = np.array([side * r.uniform(0.3, 0.9), r.uniform(-0.8, 0.8),
                              r.uniform(-0.1, 0.7)])
                d /= np.linalg.norm(d)
                centre = tuple(np.array(CAVITY_C) + d * np.array(CAVITY_R) * 0.62)
            axes = r.uniform(0.75, 1.3, 3)
            axes /= np.prod(axes) ** (1 / 3)
            p.update(site=site, centre=centre, axes=tuple(axes), hu=r.uniform(55, 85),
                     edema=r.uniform(2.0, 7.0), edema_hu=r.uniform(13, 21),
                     level=bool(r.random() < 0.15))
        elif st == "intraventricular":
            p.update(hu=r.uniform(55, 80), cast4=bool(r.random() < 0.4))
        out.append(Lesion(st, side, float(spec.lesion_ml[st]), p))
    return out


def mass_effect(lesions: list[Lesion]) -> tuple[float, dict[int, float]]:
    """Midline shift (mm in the head frame, + toward the patient's left) and per-side
    ventricle scale factors from the lesions' volumes."""
    net = sum(les.side * les.mass_ml for les in lesions)
    shift = float(np.clip(-0.14 * net, -16.0, 16.0))
    side_mass = {s: sum(les.mass_ml for les in lesions if les.side == s) for s in (1, -1)}
    scale = {}
    for s in (1, -1):
        own = min(1.0, side_mass[s] / 70.0)
        other = min(1.0, side_mass[-s] / 70.0)
        scale[s] = float(np.clip(1.0 - 0.45 * own + 0.12 * other, 0.45, 1.2))
    return shift, scale


def _surface_point(direction) -> np.ndarray:
    """Point of the cavity ellipsoid along ``direction`` from its centre."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    s = 1.0 / np.sqrt(np.sum((d / np.array(CAVITY_R)) ** 2))
    return np.array(CAVITY_C) + d * s


def _angles(x, y, z, centre, roll: float):
    """Angular offsets (radians) of points from ``centre`` seen from the cavity centre in the
    ellipsoid-normalised frame, along two tangent directions."""
    R = np.array(CAVITY_R)
    c = np.array(CAVITY_C)
    d0 = (np.asarray(centre) - c) / R
    d0 /= np.linalg.norm(d0)
    up = np.array([0.0, 0.0, 1.0]) if abs(d0[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(d0, up)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d0, e1)
    e1, e2 = np.cos(roll) * e1 + np.sin(roll) * e2, -np.sin(roll) * e1 + np.cos(roll) * e2
    qx = (x - F32(c[0])) / F32(R[0])
    qy = (y - F32(c[1])) / F32(R[1])
    qz = (z - F32(c[2])) / F32(R[2])
    a0 = qx * F32(d0[0]) + qy * F32(d0[1]) + qz * F32(d0[2])
    a1 = qx * F32(e1[0]) + qy * F32(e1[1]) + qz * F32(e1[2])
    a2 = qx * F32(e2[0]) + qy * F32(e2[1]) + qz * F32(e2[2])
    return np.arctan2(a1, a0), np.arctan2(a2, a0)


class LesionPainter:
    def __init__(self, spec: PhantomSpec, canvas: Canvas, head: HeadModel):
        self.spec = spec
        self.c = canvas
        self.head = head
        self.noise = Noise(spec.seed, "lesion", 18.0)

    def paint(self, lesions: list[Lesion]) -> None:
        # blood-in-CSF and blood-in-ventricle first, then the masses on top
        order = ["subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural"]
        for les in sorted(lesions, key=lambda les: order.index(les.subtype)):
            getattr(self, "_" + les.subtype)(les)

    def _label(self, name: str, sl, frac) -> None:
        self.c.label(name, sl, frac)
        self.c.label("hematoma", sl, frac)

    # extra-axial ---------------------------------------------------------------------------
    def _extra_axial(self, les: Lesion, profile, omega1, omega2, centre, side_limit: bool):
        c = self.c
        p0 = _surface_point(np.array(centre) - np.array(CAVITY_C))
        ext = 95.0 * max(omega1, omega2) + 20
        sl = c.box(p0 - ext, p0 + ext)
        if sl is None:
            return None, None
        x, y, z = c.coords(sl)
        a1, a2 = _angles(x, y, z, p0, les.params.get("roll", 0.0))
        rho = np.sqrt((a1 / F32(omega1)) ** 2 + (a2 / F32(omega2)) ** 2)
        # thickness < 0 outside the footprint, so that no partial-volume rim is left there
        inside = (rho < 1) & (np.abs(a1) < 1.5) & (np.abs(a2) < 1.5)  # (arctan2 wraps behind)
        thick = np.where(inside, profile(np.clip(rho, 0, 1)), F32(-1.0))
        if side_limit:  # stops at the falx
            thick = np.minimum(thick, 0.5 * (les.side * x - 1.0))
        cav = cavity_sdf(x, y, z)
        sdf = np.maximum(cav, -cav - thick.astype(F32))
        return sl, (sdf, x, y, z)

    def _epidural(self, les: Lesion) -> None:
        p = les.params
        ratio = p["ratio"]
        # lens: V = pi R^2 T / 2 with T = ratio R (R on a ~75 mm sphere)
        # (x1.2: the suture taper and the curved inner table take ~40 % of the ideal lens)
        R = 1.2 * (2 * les.target_ml * 1000 / (np.pi * ratio)) ** (1 / 3)
        T = ratio * R
        centre = np.array(p["centre"], float) * np.array([les.side, 1, 1])
        om = R / 75.0
        sl, res = self._extra_axial(les, lambda r: F32(T) * (1 - r * r) ** 0.7,
                                    om * p["aspect"], om / p["aspect"], centre, False)
        if sl is None:
            return
        sdf, x, y, z = res
        # taper to zero at the sutures of the bone that holds the lesion
        sut = self.head.sutures(x, y, z)
        p0 = _surface_point(centre - np.array(CAVITY_C))
        own = self.head.plate(x, y, z) == self.head.plate(*[np.array([v]) for v in p0])[0]
        taper = np.where(own, F32(0.9) * sut, F32(-1.0))
        cav = cavity_sdf(x, y, z)
        sdf = np.maximum(sdf, -cav - taper)
        frac = self.c.soft(sdf)
        hu = F32(p["hu"]) + F32(4.0) * self.noise(x, y, z)
        if p["swirl"]:  # active bleeding: hypodense swirls inside
            hu = hu - F32(25.0) * (self.noise(x * 2.5, y * 2.5, z * 2.5) > 0.8)
        self.c.paint(sl, frac, hu)
        self._label("epidural", sl, frac)

    def _subdural(self, les: Lesion) -> None:
        p = les.params
        om = p["extent"]
        o1, o2 = om * p["aspect"] ** 0.5, om / p["aspect"] ** 0.5
        area = np.pi * o1 * o2 * 75.0 ** 2 * 0.45  # covered area (falx, base and taper cut it)
        T = float(np.clip(les.target_ml * 1000 / area, 2.5, 28.0))
        centre = np.array(p["centre"], float) * np.array([les.side, 1, 1])
        sl, res = self._extra_axial(les, lambda r: F32(T) * (1 - r ** 2.2) ** 0.45,
                                    o1, o2, centre, True)
        if sl is None:
            return
        sdf, x, y, z = res
        # not below the tentorium
        sdf = np.maximum(sdf, (-40.0 + 0.25 * (y - 30) - z) * (y > 10))
        frac = self.c.soft(sdf)
        hu = F32(p["hu"]) + F32(3.0) * self.noise(x, y, z)
        if p.get("age") == "mixed":
            # acute-on-chronic: fresh blood settles in the dependent part (hematocrit level,
            # horizontal in the scanner frame)
            _, py, _ = self.c.coords(sl, patient=True)
            w = frac > 0.5
            if w.any():
                level = float(np.quantile(py[w], 1.0 - p["layer_frac"]))
                dep = np.clip(0.5 + (py - F32(level)) / self.c.w_xy, 0, 1)
                hu = hu + (F32(p["layer_hu"]) - hu) * dep
        self.c.paint(sl, frac, hu)
        self._label("subdural", sl, frac)

    # CSF / ventricles ----------------------------------------------------------------------
    def _subarachnoid(self, les: Lesion) -> None:
        c = self.c
        p = les.params
        csl = c.content_box
        radius = {"basal": 32.0, "convexity": 26.0, "sylvian": 24.0}[p["pattern"]]
        radius *= (les.target_ml / 6.0) ** (1 / 3)
        centre = np.array(p["centre"], float)
        sl = c.box(centre - radius * 1.3, centre + radius * 1.3)
        if sl is None:
            return
        # restrict to the content box where csf_space is defined
        sl = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, csl))
        if any(s.start >= s.stop for s in sl):
            return
        x, y, z = c.coords(sl)
        rel = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, csl))
        csf = c.csf_space[rel]
        n = self.noise(x * 1.5, y * 1.5, z * 1.5)
        dist = np.sqrt((x - F32(centre[0])) ** 2 + (y - F32(centre[1])) ** 2
                       + (z - F32(centre[2])) ** 2) / F32(radius)
        weight = (1 - smoothstep(0.6, 1.0, dist + 0.15 * n)) * F32(p["density"])
        if p["pattern"] == "basal":  # extend along both Sylvian fissures
            for s in (1, -1):
                d2 = np.sqrt((x - F32(s * 40.0)) ** 2 + ((y + 8) / 1.5) ** 2 + (z - 2.0) ** 2)
                weight = np.maximum(weight, (1 - smoothstep(10.0, 18.0, d2)) * F32(p["density"]))
        blood = csf * weight
        self.c.paint(sl, blood, F32(p["hu"]))
        # thin sulci are under half a voxel: label where blood dominates the voxel after
        # the partial-volume mix, i.e. where it raises the voxel above ~ 35 HU
        lab = np.minimum(np.clip(blood * 1.6, 0, 1), c.labels["brain"][sl])
        self._label("subarachnoid", sl, lab)

    def _intraventricular(self, les: Lesion) -> None:
        c = self.c
        vent = None
        for name in ("ventricle_left", "ventricle_right", "ventricle_other"):
            v = c.labels.get(name)
            if v is not None:
                vent = v if vent is None else np.maximum(vent, v)
        if vent is None:
            return
        sl = c.content_box
        v = vent[sl]
        _, py, _ = c.coords(sl, patient=True)
        voxel_ml = c.geom.model_pixel ** 2 * c.geom.normal_spacing / 1000.0
        total = float(v.sum()) * voxel_ml
        target = min(les.target_ml, 0.65 * total)
        # horizontal fluid level (patient y, gravity +y): fill from the most dependent voxels
        inside = v > 0
        vy, vv = py[inside], v[inside]
        order = np.argsort(-vy)
        cum = np.cumsum(vv[order]) * voxel_ml
        idx = int(np.searchsorted(cum, target))
        level = float(vy[order[min(idx, order.size - 1)]])
        frac = v * np.clip(0.5 + (py - F32(level)) / c.w_xy, 0, 1)
        x, y, z = c.coords(sl)
        if les.params.get("cast4"):
            cast = c.soft(ellipsoid(x, y, z, (0, 36, -48), (7.0, 4.0, 7.0)))
            frac = np.maximum(frac, np.minimum(cast, v))
        hu = F32(les.params["hu"]) + F32(3.0) * self.noise(x, y, z)
        c.paint(sl, frac, hu)
        self._label("intraventricular", sl, frac)
        les.params["level_patient_y"] = level

    # parenchyma ----------------------------------------------------------------------------
    def _intraparenchymal(self, les: Lesion) -> None:
        c = self.c
        p = les.params
        r0 = (3 * les.target_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        axes = np.array(p["axes"]) * r0
        centre = np.array(p["centre"], float)
        if p["site"] in ("putamen", "thalamus"):  # a big deep clot grows laterally, not across
            centre[0] = les.side * max(abs(centre[0]), 6.0 + 0.8 * axes[0])
            p["centre"] = tuple(centre)
        ext = axes.max() * 1.5 + p["edema"] + 6
        sl = c.box(centre - ext, centre + ext)
        if sl is None:
            return
        x, y, z = c.coords(sl)
        n = self.noise(x * 28 / max(r0, 6), y * 28 / max(r0, 6), z * 28 / max(r0, 6))
        e = ellipsoid(x, y, z, centre, axes) + F32(0.22 * r0) * n
        if les.side:  # parenchymal blood stays in its hemisphere (falx)
            e = np.maximum(e, F32(2.5) - les.side * self.head.warp.x_brain(x, y, z))
        cav = cavity_sdf(x, y, z)
        inside = c.soft(cav + F32(3.0))  # stays inside the brain
        ed = e - F32(p["edema"]) * (1 + 0.5 * self.noise(x * 2, y * 2, z * 2))
        c.paint(sl, c.soft(ed) * inside, F32(p["edema_hu"]))
        vent = np.zeros_like(inside)
        for name in ("ventricle_left", "ventricle_right", "ventricle_other"):
            if name in c.labels:
                vent = np.maximum(vent, c.labels[name][sl])
        # blood reaching a ventricle is IVH, not IPH: the clot stops at the ependyma
        frac = c.soft(e) * inside * (1 - vent)
        core = np.clip(-e / max(r0 * 0.5, 1.0), 0, 1)
        hu = F32(p["hu"]) + F32(6.0) * self.noise(x * 3, y * 3, z * 3) + F32(6.0) * core
        if p["level"]:  # coagulopathy: fluid-blood level in the patient frame
            _, py, _ = c.coords(sl, patient=True)
            cy = float(c.geom.head_to_patient(centre)[1])
            hu = np.where(py > cy, hu + 12, hu - 15).astype(F32)
        c.paint(sl, frac, hu)
        self._label("intraparenchymal", sl, frac)
