"""Defacing measured on phantoms (ground-truth face, ears and brain masks), both modes.

    .venv/bin/python benchmarks/deface.py                 # default sweep (256 matrix)
    .venv/bin/python benchmarks/deface.py --matrix 512 --cases 0:0
    .venv/bin/python benchmarks/deface.py --preview-dir /tmp/deface-previews

Prints one row per (phantom, mode): share of face voxels destroyed (all face voxels: soft tissue
and facial bone), of facial soft tissue (what a surface rendering shows), of ear voxels, the
number of brain voxels changed (bar: 0), and the defacing time. Cases are SEED:YAW pairs; yaw
turns the head in the scanner (degrees, positive = towards the patient's left).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CASES = "3:0,5:35,7:-70,11:90,13:-20"


def main() -> None:
    from models.phantom import PhantomSpec, generate_study
    from workers.deid.deface import deface
    from workers.deid.evaluate import score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="SEED:YAW,... (default %(default)s)")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--thickness", type=float, default=2.5)
    ap.add_argument("--pixel", type=float, default=None,
                    help="pixel spacing at matrix 512 (0.55 = 28 cm field of view, whole face)")
    ap.add_argument("--preview-dir", type=Path, default=None, help="write before/after PNGs")
    args = ap.parse_args()

    header = (f"{'seed':>4} {'yaw':>5} {'mode':<8} {'face%':>6} {'soft%':>6} {'ears%':>6} "
              f"{'brainΔ':>7} {'brain':>8} {'sec':>6}  anterior")
    print(f"matrix {args.matrix}, slices {args.thickness} mm, pixel@512 {args.pixel or 'drawn'}")
    print(header)
    print("-" * len(header))
    for case in args.cases.split(","):
        seed, yaw = (float(x) for x in case.split(":"))
        t0 = time.perf_counter()
        study = generate_study(PhantomSpec(seed=int(seed), matrix=args.matrix,
                                           slice_thickness_mm=args.thickness, yaw_deg=yaw,
                                           pixel_spacing_mm=args.pixel))
        gen_s = time.perf_counter() - t0
        masks = study.masks
        for mode in ("ichnode", "mosmed"):
            result = deface(study.volume, mode, seed=int(seed))
            s = score(study.volume, result, masks["face"], masks["brain"], masks["ears"])
            source = result.info.get("anterior_source", "image top (fixed)")
            print(f"{int(seed):>4} {yaw:>5.0f} {mode:<8} {100 * s['face_destroyed']:>6.1f} "
                  f"{100 * s['face_soft_destroyed']:>6.1f} {100 * s['ears_destroyed']:>6.1f} "
                  f"{s['brain_changed']:>7d} {s['brain_voxels']:>8d} {s['seconds']:>6.1f}  "
                  f"{source}", flush=True)
            if args.preview_dir:
                from workers.deid.preview import write_preview

                write_preview(study.volume, result.volume,
                              args.preview_dir / f"seed{int(seed)}_yaw{int(yaw)}_{mode}.png",
                              title=f"{mode}, seed {int(seed)}, yaw {yaw:.0f}")
        print(f"     (phantom generation {gen_s:.0f} s, {study.volume.hu.shape[0]} slices)")


if __name__ == "__main__":
    main()
