"""Evaluation on held-out data: phantom seeds from TEST_BASE (never used by training or
validation), run through the same ``analyze_volume`` as production, measured on the ORIGINAL grid.

Metrics: per-label study AUC and sensitivity/specificity of the calls made (stored operating
thresholds; subtypes only where "any" is present); the worklist flag (ICH present or not);
Dice for hematoma (positive studies) and ventricles; hematoma volume error (mL and %);
midline-shift error (mm); false-positive hematoma volume on normal studies.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from models.ich.train import ProgressFn, TEST_BASE, _plain_progress, dice
from models.results import LABELS, SUBTYPES

BARS = {
    "auc_any": 0.97, "auc_subtype": 0.93, "dice_hematoma": 0.85, "volume_abs_error_ml": 1.5,
    "volume_rel_error": 0.10, "shift_abs_error_mm": 1.5, "fp_volume_ml_normals": 0.5,
}


@dataclass
class EvalConfig:
    what: str = "all"  # triage | segment | all
    studies: int = 60
    matrix: int = 256
    thickness: float | None = 5.0
    threads: int = 2


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def triage_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                   present: np.ndarray) -> dict:
    """Per label: AUC, and sensitivity/specificity of the calls the product made (``present``,
    (studies, labels): each study at its own thresholds, as a pixel-spacing band may give a
    study other ones, and subtypes only where "any" is present)."""
    out = {}
    for n, label in enumerate(LABELS):
        y, p, called = labels[:, n] > 0.5, probs[:, n], present[:, n]
        auc = _auc(y.astype(int), p)
        used = sorted({round(float(t), 4) for t in thresholds[:, n]})
        out[label] = {
            "auc": None if auc is None else round(auc, 4),
            "sensitivity": round(float(called[y].mean()), 4) if y.any() else None,
            "specificity": round(float((~called[~y]).mean()), 4) if (~y).any() else None,
            "threshold": used[0] if len(used) == 1 else used,
            "positives": int(y.sum()), "negatives": int((~y).sum()),
        }
    return out


def flag_metrics(positive: np.ndarray, present: np.ndarray) -> dict:
    """What the worklist sees: a study is flagged when "any" or a subtype is called present
    (node/priority.py), measured on its own because a subtype call alone once flagged every
    normal study."""
    flagged = present.any(axis=1)
    return {
        "sensitivity": round(float(flagged[positive].mean()), 4) if positive.any() else None,
        "specificity": round(float((~flagged[~positive]).mean()), 4) if (~positive).any() else None,
        "false_alarms": int((flagged & ~positive).sum()), "missed": int((~flagged & positive).sum()),
    }


def _summary(values: Iterable[float | None]) -> dict | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    return {"mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p90": round(float(np.percentile(v, 90)), 4), "max": round(float(v.max()), 4),
            "n": int(v.size)}


def evaluate_phantoms(cfg: EvalConfig, settings=None, progress: ProgressFn = _plain_progress) -> dict:  # noqa: ANN001
    """Full-pipeline evaluation on phantom seeds TEST_BASE.. (held out by construction)."""
    import torch

    from models.ich.data import phantom_study, study_truth
    from models.ich.inference import analyze_volume, load_models

    torch.set_num_threads(cfg.threads)
    bundles = load_models(settings)
    rows = []
    seeds = [TEST_BASE + i for i in range(cfg.studies)]
    start = time.time()
    for seed in progress(seeds, "evaluating", len(seeds)):
        study = phantom_study(seed, cfg.matrix, cfg.thickness)
        truth = study_truth(study)
        result, masks = analyze_volume(study.volume, settings, bundles=bundles)
        true_hem = np.asarray(study.masks["hematoma"], bool)
        true_vol = truth["hematoma_volume_ml"]
        # predicted, true, overlap: the Dice and the pooled Dice both derive from them
        counts = [int(masks["hematoma"].sum()), int(true_hem.sum()),
                  int((masks["hematoma"] & true_hem).sum())]
        if true_vol is None:
            true_vol = float(true_hem.sum()) * study.volume.voxel_volume_ml
        rows.append({
            "seed": seed,
            "labels": truth["study_labels"],
            "probs": [result.findings[label].probability for label in LABELS],
            "thresholds": [result.findings[label].threshold for label in LABELS],
            "present": [result.findings[label].present for label in LABELS],
            "operating_point": result.operating_point,
            "dice_hematoma": 2 * counts[2] / (counts[0] + counts[1]) if true_hem.any() else None,
            "hematoma_voxels": counts,
            "subtype_recall": subtype_recall(masks["hematoma"], study.masks),
            "dice_ventricle_left": dice(masks["ventricle_left"],
                                        np.asarray(study.masks["ventricle_left"], bool)),
            "dice_ventricle_right": dice(masks["ventricle_right"],
                                         np.asarray(study.masks["ventricle_right"], bool)),
            "true_volume_ml": true_vol, "pred_volume_ml": result.hematoma_volume_ml,
            "abc2_ml": result.hematoma_abc2_ml,
            "true_shift_mm": truth["midline_shift_mm"], "pred_shift_mm": result.midline_shift_mm,
            "seconds": result.seconds.get("total"),
        })
    return summarise(rows, cfg, time.time() - start, [b.sha256 for b in bundles[:2]])


def subtype_recall(predicted: np.ndarray, true_masks: dict) -> dict:
    """Share of each present subtype's voxels inside the predicted hematoma mask."""
    out = {}
    for subtype in SUBTYPES:
        mask = true_masks.get(subtype)
        if mask is not None and np.asarray(mask, bool).any():
            mask = np.asarray(mask, bool)
            out[subtype] = float((predicted & mask).sum() / mask.sum())
    return out


def by_subtype(rows: list[dict]) -> dict:
    """Where the hematoma Dice is lost: per subtype, the voxel recall over studies holding it
    and the Dice of studies holding only that subtype."""
    out = {}
    for subtype in SUBTYPES:
        recall = [r["subtype_recall"][subtype] for r in rows if subtype in r.get("subtype_recall", {})]
        alone = [r["dice_hematoma"] for r in rows if list(r.get("subtype_recall", {})) == [subtype]]
        out[subtype] = {"studies": len(recall), "recall": _summary(recall),
                        "dice_single_subtype": _summary(alone)}
    return out


def pooled_dice(rows: list[dict]) -> float | None:
    """Dice over all positive studies' voxels together (large hematomas weigh more)."""
    sums = np.array([r["hematoma_voxels"] for r in rows if r.get("dice_hematoma") is not None])
    if sums.size == 0 or sums[:, :2].sum() == 0:
        return None
    return round(float(2 * sums[:, 2].sum() / sums[:, :2].sum()), 4)


def summarise(rows: list[dict], cfg: EvalConfig, seconds: float, checksums: list[str]) -> dict:
    labels = np.array([r["labels"] for r in rows], dtype=float)
    probs = np.array([r["probs"] for r in rows], dtype=float)
    thresholds = np.array([r["thresholds"] for r in rows], dtype=float)
    present = np.array([r["present"] for r in rows], dtype=bool)
    positive = labels[:, -1] > 0.5
    out: dict = {"held_out": f"phantom seeds {TEST_BASE}..{TEST_BASE + cfg.studies - 1}",
                 "studies": len(rows), "positives": int(positive.sum()),
                 "matrix": cfg.matrix, "slice_thickness_mm": cfg.thickness,
                 "model_sha256": checksums, "seconds": round(seconds, 1),
                 "operating_points": dict(Counter(r["operating_point"] for r in rows))}
    if cfg.what in ("triage", "all"):
        out["triage"] = triage_metrics(labels, probs, thresholds, present)
        out["worklist_flag"] = flag_metrics(positive, present)
    if cfg.what in ("segment", "all"):
        vol_err = [abs(r["pred_volume_ml"] - r["true_volume_ml"]) for r, p in zip(rows, positive) if p]
        rel_err = [abs(r["pred_volume_ml"] - r["true_volume_ml"]) / max(r["true_volume_ml"], 1e-6)
                   for r, p in zip(rows, positive) if p]
        within = [a <= BARS["volume_abs_error_ml"] or b <= BARS["volume_rel_error"]
                  for a, b in zip(vol_err, rel_err)]
        abc_err = [(r["abc2_ml"] - r["true_volume_ml"]) / max(r["true_volume_ml"], 1e-6)
                   for r, p in zip(rows, positive) if p and r["abc2_ml"] is not None]
        shift_err = [abs((r["pred_shift_mm"] or 0.0) - r["true_shift_mm"]) for r in rows
                     if r["true_shift_mm"] is not None]
        fp = [r["pred_volume_ml"] for r, p in zip(rows, positive) if not p]
        out["segment"] = {
            "dice_hematoma": _summary(r["dice_hematoma"] for r in rows),
            "dice_hematoma_pooled": pooled_dice(rows),
            "hematoma_by_subtype": by_subtype(rows),
            "dice_ventricle_left": _summary(r["dice_ventricle_left"] for r in rows),
            "dice_ventricle_right": _summary(r["dice_ventricle_right"] for r in rows),
            "volume_abs_error_ml": _summary(vol_err),
            "volume_rel_error": _summary(rel_err),
            "volume_within_bar_share": round(float(np.mean(within)), 4) if within else None,
            "abc2_rel_bias": _summary(abc_err),
            "shift_abs_error_mm": _summary(shift_err),
            "shift_missing": sum(r["pred_shift_mm"] is None for r in rows),
            "fp_volume_ml_normals": _summary(fp),
            "fp_normals_over_0_5ml": int(sum(v > BARS["fp_volume_ml_normals"] for v in fp)),
        }
    out["seconds_per_study"] = _summary(r["seconds"] for r in rows)
    out["bars"] = check_bars(out)
    return out


def check_bars(out: dict) -> dict:
    """Each issue bar with the measured figure and whether it is met."""
    bars = {}
    tri = out.get("triage")
    if tri:
        bars["auc_any>=0.97"] = tri["any"]["auc"] is not None and tri["any"]["auc"] >= BARS["auc_any"]
        for label in LABELS[:-1]:
            auc = tri[label]["auc"]
            bars[f"auc_{label}>=0.93"] = None if auc is None else auc >= BARS["auc_subtype"]
    seg = out.get("segment")
    if seg:
        d = seg["dice_hematoma"]
        bars["dice_hematoma_mean>=0.85"] = d is not None and d["mean"] >= BARS["dice_hematoma"]
        bars["volume_err<=1.5mL_or_10%"] = (seg["volume_within_bar_share"] or 0) >= 0.9
        s = seg["shift_abs_error_mm"]
        bars["shift_err_mean<=1.5mm"] = s is not None and s["mean"] <= BARS["shift_abs_error_mm"]
        bars["no_fp_over_0.5mL"] = seg["fp_normals_over_0_5ml"] == 0
    return bars
