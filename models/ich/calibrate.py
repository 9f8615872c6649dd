"""Re-choose a triage bundle's calibration and operating thresholds on validation data.

Training ends with this step; run it on its own to move the operating point (a site that wants
0.98 sensitivity for "any") or after a change of the threshold rule, without retraining::

    python -m models.ich.calibrate --write models/weights/triage --sensitivity 0.95
    python -m models.ich.calibrate --write BUNDLE --dataset rsna:/data/rsna   # your own data
    python -m models.ich.calibrate --write BUNDLE --matrix 512 --band 0:0.7  # a spacing band

``--band LOW:HIGH`` stores the result as the operating point of series whose in-plane pixel
spacing lies in [LOW, HIGH) mm (``spacing_bands``), leaving the default one as it is: validate
it on data of that spacing (phantoms at ``--matrix 512`` have 0.38-0.55 mm pixels).

Validation only (phantom seeds 500000.. or the dataset's hash-split "val" part), never the
evaluation seeds. Writes ``calibration``, ``thresholds`` and ``operating_point`` into the
bundle's config.json; the weights (and so the checksum) do not change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.ich.bundle import load_bundle
from models.ich.train import TrainConfig, calibration_config, cascade_segmenter, load_cases


def recalibrate(triage_dir: Path, segment_dir: Path | None, cfg: TrainConfig, val=None) -> dict:  # noqa: ANN001
    """New temperatures, thresholds and validation AUCs for the triage bundle in ``triage_dir``
    (validation cases from ``cfg``, or ``val`` given directly)."""
    triage = load_bundle(triage_dir, "triage")
    seg_bundle = cascade_segmenter(triage.network, segment_dir, triage.frame)
    segmenter = seg_bundle.network.eval() if seg_bundle is not None else None
    val = list(val) if val is not None else load_cases(cfg, "val", cfg.val_studies)
    update, aucs = calibration_config(triage.network.eval(), val, cfg.target_sensitivity, segmenter)
    update["operating_point"]["validation_auc"] = aucs
    return update


def with_band(bands: list[dict], band: tuple[float, float], update: dict) -> list[dict]:
    """``bands`` with ``update`` as the entry for ``band`` (replacing one of the same range),
    sorted by range. Overlapping ranges are refused: which one applies would be ambiguous."""
    lo, hi = band
    kept = [b for b in bands if tuple(b["pixel_spacing_mm"]) != band]
    for b in kept:
        if b["pixel_spacing_mm"][0] < hi and lo < b["pixel_spacing_mm"][1]:
            raise SystemExit(f"band {lo:g}:{hi:g} overlaps {b['pixel_spacing_mm']}")
    return sorted([*kept, {"pixel_spacing_mm": [lo, hi], **update}],
                  key=lambda b: b["pixel_spacing_mm"][0])


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW:HIGH in mm") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LOW < HIGH")
    return lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, required=True, help="triage bundle folder")
    parser.add_argument("--segment", type=Path, default=None,
                        help="segment bundle the triage model sees (default: the demo one)")
    parser.add_argument("--sensitivity", type=float, default=0.95)
    # 200 phantoms hold ~110 positives for "any"; with 48 (~30) the threshold moved with
    # single studies.
    parser.add_argument("--val-studies", type=int, default=200)
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--thickness", type=float, default=5.0)
    parser.add_argument("--cache", type=Path, default=Path("var/cache/phantoms"))
    parser.add_argument("--band", type=_band, default=None, metavar="LOW:HIGH",
                        help="store as the operating point of this pixel-spacing band (mm)")
    args = parser.parse_args()
    triage = json.loads((args.write / "config.json").read_text())
    frame = triage["frame"]
    cfg = TrainConfig(kind="triage", out=args.write, val_studies=args.val_studies,
                      matrix=args.matrix, thickness=args.thickness or None, dataset=args.dataset,
                      spacing_mm=frame["spacing_mm"], size=frame["size"], cache_dir=args.cache,
                      target_sensitivity=args.sensitivity)
    update = recalibrate(args.write, args.segment, cfg)
    if args.band:
        update["operating_point"].update(matrix=args.matrix, dataset=args.dataset)
        update = {"spacing_bands": with_band(triage.get("spacing_bands", []), args.band, update)}
    triage.update(update)
    (args.write / "config.json").write_text(json.dumps(triage, indent=2) + "\n")
    print(json.dumps(update, indent=2))


if __name__ == "__main__":
    main()
