"""Re-choose a triage bundle's calibration and operating thresholds on validation data.

Training ends with this step; run it on its own to move the operating point (a site that wants
0.98 sensitivity for "any") or after a change of the threshold rule, without retraining::

    python -m models.ich.calibrate --write models/weights/triage --sensitivity 0.95
    python -m models.ich.calibrate --write BUNDLE --dataset rsna:/data/rsna   # your own data

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
    args = parser.parse_args()
    triage = json.loads((args.write / "config.json").read_text())
    frame = triage["frame"]
    cfg = TrainConfig(kind="triage", out=args.write, val_studies=args.val_studies,
                      matrix=args.matrix, thickness=args.thickness or None, dataset=args.dataset,
                      spacing_mm=frame["spacing_mm"], size=frame["size"], cache_dir=args.cache,
                      target_sensitivity=args.sensitivity)
    update = recalibrate(args.write, args.segment, cfg)
    triage.update(update)
    (args.write / "config.json").write_text(json.dumps(triage, indent=2) + "\n")
    print(json.dumps(update, indent=2))


if __name__ == "__main__":
    main()
