"""How long the report step's object building takes (SEG, SR, overlay) for one study.

Prints figures; never asserts. Usage:
    .venv/bin/python benchmarks/results_build.py [--matrix 512] [--slices 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from results_helpers import analysis_result, write_ct_series  # noqa: E402
from workers.report.builder import build_results  # noqa: E402
from workers.report.sources import load_sources, slice_volumes_ml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tilt", type=float, default=0.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        st = write_ct_series(tmp / "ct", slices=args.slices, matrix=args.matrix, tilt_deg=args.tilt,
                             subtypes=("intraparenchymal", "subdural"))
        t0 = time.perf_counter()
        sources = load_sources(st.paths)
        read_s = time.perf_counter() - t0
        result = analysis_result(st.masks, voxel_ml=float(slice_volumes_ml(sources).mean()),
                                 present=("intraparenchymal", "subdural"))
        times = []
        for n in range(args.repeat):
            t0 = time.perf_counter()
            built = build_results(sources, result, st.masks, None, tmp / f"out{n}", uid_seed=str(n),
                                  priority="URGENT")
            times.append(time.perf_counter() - t0)
        sizes = {p.name: p.stat().st_size for p in built.paths}
    print(f"series: {args.slices} slices of {args.matrix}x{args.matrix}, tilt {args.tilt:g} deg")
    print(f"read + sort original instances: {read_s:.2f} s")
    print(f"build SEG+SR+overlay: median {statistics.median(times):.2f} s (n={len(times)}, "
          f"min {min(times):.2f}, max {max(times):.2f})")
    print(f"objects: {len(sizes)} (SEG {sizes.get('seg.dcm', 0) / 1e6:.2f} MB, "
          f"SR {sizes.get('sr.dcm', 0) / 1e3:.0f} kB, overlay {sum(v for k, v in sizes.items() if k.startswith('overlay')) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
