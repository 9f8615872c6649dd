"""Per-study time of triage + segmentation (+ measurements) on a 5 mm 512x512 whole-head study.

    .venv/bin/python benchmarks/inference.py [--repeats 3] [--device auto|cpu|cuda] [--threads 2]

Prints one JSON object: the study shape, the device, and per-stage seconds (median of the
repeats after one warm-up run). The phantom is generated before timing starts. Bars from
issue 4: <= 20 s on 2 CPU cores, <= 2 s on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=900_123)
    parser.add_argument("--triage", type=Path, default=None, help="triage bundle (default: demo)")
    parser.add_argument("--segment", type=Path, default=None, help="segment bundle (default: demo)")
    args = parser.parse_args()

    import torch

    from models.ich.inference import analyze_volume, load_models
    from models.phantom import PhantomSpec, generate_study

    torch.set_num_threads(args.threads)
    settings = SimpleNamespace(models=SimpleNamespace(triage=args.triage, segment=args.segment,
                                                      device=args.device))
    t = time.perf_counter()
    study = generate_study(PhantomSpec.random(args.seed, matrix=512, slice_thickness_mm=5.0,
                                              subtypes=("intraparenchymal", "subdural")))
    generate_s = time.perf_counter() - t
    bundles = load_models(settings)
    analyze_volume(study.volume, settings, bundles=bundles)  # warm-up (allocations, cuDNN)
    runs = []
    for _ in range(args.repeats):
        if bundles[2].type == "cuda":
            torch.cuda.synchronize()
        result, _ = analyze_volume(study.volume, settings, bundles=bundles)
        runs.append(result.seconds)
    stages = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    print(json.dumps({
        "study": {"shape": list(study.volume.hu.shape), "spacing_mm": study.volume.spacing,
                  "generated_s": round(generate_s, 1)},
        "device": str(bundles[2]) + (f" ({torch.cuda.get_device_name()})"
                                     if bundles[2].type == "cuda" else f" ({args.threads} threads)"),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "seconds_median": stages,
        "per_study_s": stages["total"],
    }, indent=2))


if __name__ == "__main__":
    main()
