"""Phantom generation speed: seconds per study, single core (prints figures, asserts nothing).

    .venv/bin/python benchmarks/phantom.py [--repeat 5]

Runs with one BLAS/OpenMP thread and reports the median wall time of ``generate_study`` per
configuration, and of writing the DICOM series. The target is a 5 mm 512x512 whole-head study
in <= 2 s on one core.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from models.phantom import PhantomSpec, generate_study, write_dicom_series  # noqa: E402

CONFIGS = [("5 mm, 512", 512, 5.0), ("5 mm, 256", 256, 5.0), ("5 mm, 128", 128, 5.0),
           ("2.5 mm, 512", 512, 2.5), ("1.25 mm, 256", 256, 1.25)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    generate_study(PhantomSpec(seed=0, matrix=128, slice_thickness_mm=5.0))  # warm caches
    # CPU seconds of this process = single-core time even on a shared, loaded machine
    print(f"{'config':<14} {'slices':>6} {'wall med s':>10} {'cpu med s':>10} {'cpu min s':>10}")
    for name, matrix, thick in CONFIGS:
        wall, cpu, slices = [], [], 0
        for seed in range(args.repeat):
            spec = PhantomSpec.random(100 + seed, matrix=matrix, slice_thickness_mm=thick)
            t, c = time.perf_counter(), time.process_time()
            st = generate_study(spec)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            slices = st.volume.hu.shape[0]
        print(f"{name:<14} {slices:>6} {statistics.median(wall):>10.2f} "
              f"{statistics.median(cpu):>10.2f} {min(cpu):>10.2f}")
    st = generate_study(PhantomSpec.random(7, matrix=512, slice_thickness_mm=5.0))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = write_dicom_series(st, Path(tmp))
        dt = time.perf_counter() - t
    print(f"DICOM write, 5 mm 512: {len(paths)} files in {dt:.2f} s")


if __name__ == "__main__":
    main()
