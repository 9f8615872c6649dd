"""NER throughput on CPU: notes per second, one note at a time and in batches.

    .venv/bin/python benchmarks/ner.py [--model DIR] [--notes 256] [--threads 1]

Uses held-out synthetic notes (English and Chinese); prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models.ner.inference import NerModel
from models.ner.synth import HELDOUT_SEED, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: demo)")
    parser.add_argument("--notes", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = NerModel(args.model)
    print(f"model {model.info['name']} {model.info['version']} ({model.folder}), "
          f"torch threads {torch.get_num_threads()}")
    for lang in ("en", "zh"):
        docs = generate(args.notes, HELDOUT_SEED + 7, lang)
        texts = [d.text for d in docs]
        chars = sum(len(t) for t in texts)
        model.extract(texts[0])  # warm-up
        latencies = []
        for text in texts:
            t0 = time.perf_counter()
            model.extract(text)
            latencies.append(time.perf_counter() - t0)
        single = len(texts) / sum(latencies)
        t0 = time.perf_counter()
        model.predict(texts, langs=[lang] * len(texts), batch_size=args.batch)
        batch_s = time.perf_counter() - t0
        print(f"{lang}: {len(texts)} notes, mean {chars / len(texts):.0f} chars | single: "
              f"{single:.1f} notes/s (median {statistics.median(latencies) * 1000:.1f} ms, "
              f"p95 {sorted(latencies)[int(0.95 * len(latencies))] * 1000:.1f} ms) | "
              f"batch {args.batch}: {len(texts) / batch_s:.1f} notes/s")


if __name__ == "__main__":
    main()
