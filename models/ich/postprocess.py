"""Hematoma mask post-processing: the false-positive rule and its tuning on VALIDATION phantoms.

The segmenter leaves small false-positive blobs on normal studies (partial volume at the skull
base, noise). The rule, stored as ``"postprocess"`` in the segment bundle's config.json:

* ``gate_any``: drop the whole mask when the triage study probability for "any" is below this
  (the cascade agrees there is no bleed);
* ``min_component_ml``: drop connected components smaller than this;
* ``hu_range``: drop components whose mean HU (original grid) lies outside [lo, hi]
  (acute blood is ~40-100 HU; calcification/bone partial volume is brighter, CSF darker).

Without the key the old behaviour applies (specks < 0.05 mL removed). Parameters are chosen by
``python -m models.ich.postprocess`` on validation seeds (500000..), never on evaluation seeds.

After the rule, inference empties the mask when the triage model does not call "any" present
(its operating threshold, above any useful gate), so the tuning here only sees the masks of
studies called a bleed: a gate at or below that threshold changes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

SAFETY_ML = 0.25  # tuning aims for normals below half the 0.5 mL bar
DEFAULT_RULE = {"gate_any": 0.0, "min_component_ml": 0.05, "hu_range": [-1024.0, 3071.0]}


def rule_of(config: dict) -> dict:
    return {**DEFAULT_RULE, **(config.get("postprocess") or {})}


def component_stats(mask: np.ndarray, hu: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, list[dict]]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return labels, []
    idx = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones_like(hu, dtype=np.float32), labels, idx)
    means = ndimage.mean(hu, labels, idx)
    return labels, [{"label": int(i), "ml": float(c) * voxel_ml, "mean_hu": float(m)}
                    for i, c, m in zip(idx, counts, means)]


def keep_component(comp: dict, any_prob: float, rule: dict) -> bool:
    lo, hi = rule["hu_range"]
    return (any_prob >= rule["gate_any"] and comp["ml"] >= rule["min_component_ml"]
            and lo <= comp["mean_hu"] <= hi)


def apply_rule(mask: np.ndarray, hu: np.ndarray, voxel_ml: float, any_prob: float,
               rule: dict) -> np.ndarray:
    """The hematoma mask with the rule's rejected components removed (same grid)."""
    if not mask.any():
        return mask.astype(bool)
    labels, comps = component_stats(mask, hu, voxel_ml)
    keep = np.zeros(len(comps) + 1, dtype=bool)
    for comp in comps:
        keep[comp["label"]] = keep_component(comp, any_prob, rule)
    return keep[labels]


# ----- tuning on validation data ----------------------------------------------------------------
def collect(seeds: list[int], matrix: int, thickness: float, threads: int = 2) -> list[dict]:
    """Raw (rule-free) outputs of the full pipeline on validation phantoms, per component."""
    import copy

    import torch

    from models.ich.data import phantom_study
    from models.ich.inference import analyze_volume, load_models
    from node.config import load_settings

    torch.set_num_threads(threads)
    # The configured bundles (ICHNODE_MODELS__TRIAGE/SEGMENT or ichnode.yaml), so a candidate
    # segmenter is tuned with the triage model it will run beside.
    triage, segment, device = load_models(load_settings())
    segment = copy.copy(segment)
    segment.config = {k: v for k, v in segment.config.items() if k != "postprocess"}
    rows = []
    for seed in seeds:
        study = phantom_study(seed, matrix, thickness)
        result, masks = analyze_volume(study.volume, bundles=(triage, segment, device))
        truth = np.asarray(study.masks["hematoma"], bool)
        labels, comps = component_stats(masks["hematoma"], study.volume.hu, study.volume.voxel_volume_ml)
        for comp in comps:
            region = labels == comp["label"]
            comp["tp_voxels"] = int((region & truth).sum())
            comp["voxels"] = int(region.sum())
        rows.append({"seed": seed, "any": result.findings["any"].probability, "components": comps,
                     "true_voxels": int(truth.sum()), "voxel_ml": study.volume.voxel_volume_ml})
    return rows


def score(rows: list[dict], rule: dict) -> dict:
    """Dice (positives), FP volume on normals, volume error, for one rule (from component stats)."""
    dices, fps, errs = [], [], []
    for r in rows:
        kept = [c for c in r["components"] if keep_component(c, r["any"], rule)]
        pred = sum(c["voxels"] for c in kept)
        tp = sum(c["tp_voxels"] for c in kept)
        if r["true_voxels"]:
            dices.append(2 * tp / (pred + r["true_voxels"]))
            errs.append(abs(pred - r["true_voxels"]) * r["voxel_ml"])
        else:
            fps.append(pred * r["voxel_ml"])
    return {"dice": float(np.mean(dices)) if dices else None,
            "fp_over_0_5ml": int(sum(f > 0.5 for f in fps)),
            "fp_over_margin": int(sum(f > SAFETY_ML for f in fps)), "fp_max_ml": max(fps, default=0.0),
            "volume_err_median_ml": float(np.median(errs)) if errs else None}


def tune(rows: list[dict], max_dice_loss: float = 0.03) -> tuple[dict, dict]:
    """Fewest normals with FP > 0.5 mL first, then fewest above half of it (SAFETY_ML: a rule
    that only just passes on validation fails on new studies, as a demo segmenter whose largest
    validation FP was 0.45 mL did on held-out data), then the best Dice (ties: the milder rule).

    Rules that cost more than ``max_dice_loss`` of mean Dice on positives are not considered:
    a gate that silences real bleeds to clean up normals is a bad trade.
    """
    floor = (score(rows, DEFAULT_RULE)["dice"] or 0.0) - max_dice_loss
    best = None
    for gate in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        for min_ml in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0):
            for lo, hi in ((-1024.0, 3071.0), (20.0, 120.0), (30.0, 100.0), (40.0, 95.0)):
                rule = {"gate_any": gate, "min_component_ml": min_ml, "hu_range": [lo, hi]}
                s = score(rows, rule)
                if (s["dice"] or 0.0) < floor:
                    continue
                key = (-s["fp_over_0_5ml"], -s["fp_over_margin"], round(s["dice"] or 0.0, 3),
                       -gate, -min_ml, lo - hi)
                if best is None or key > best[0]:
                    best = (key, rule, s)
    return best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description="Tune the hematoma FP rule on validation phantoms")
    parser.add_argument("--val-studies", type=int, default=48)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--thickness", type=float, default=5.0)
    parser.add_argument("--write", type=Path, help="segment bundle folder whose config.json gets the rule")
    args = parser.parse_args()
    from models.ich.train import VAL_BASE

    rows = collect([VAL_BASE + i for i in range(args.val_studies)], args.matrix, args.thickness)
    print("no rule :", json.dumps(score(rows, DEFAULT_RULE)))
    rule, s = tune(rows)
    print("tuned   :", json.dumps(rule), json.dumps(s))
    if args.write:
        path = args.write / "config.json"
        config = json.loads(path.read_text())
        config["postprocess"] = {**rule, "chosen_on": f"validation phantoms {VAL_BASE}.."
                                 f"{VAL_BASE + args.val_studies - 1} (matrix {args.matrix}, "
                                 f"{args.thickness} mm)", "validation": s}
        path.write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
